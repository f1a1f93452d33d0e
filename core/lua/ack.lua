-- ack: finish a batch of leased tasks, token-checked, atomically.
-- KEYS[1..12]  the agent's fixed keys (see _prelude.lua)
-- KEYS[13..]   result keys, by index
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2] result TTL ms (0 = keep no result)
-- ARGV[3] n, then n groups of 5: id, token, result_json ('' = null), result_key_index, handoffs
-- A task whose token no longer matches (its lease expired and another worker holds it, or it
-- already finished) is left exactly as it is and reported.
-- Returns: the list of stale ids.
local now = now_ms(ARGV[1])
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local stale = {}
local done, handed_off = 0, 0
for i = 0, n - 1 do
  local o = 3 + i * 5
  local id, token, result, rk, handoffs = ARGV[o + 1], ARGV[o + 2], ARGV[o + 3], tonumber(ARGV[o + 4]), tonumber(ARGV[o + 5])
  if redis.call('HGET', K_TOKENS, id) == token then
    redis.call('ZREM', K_LEASES, id)
    forget(id)
    if ttl > 0 and rk > 0 then
      if result == '' then result = 'null' end
      redis.call('SET', KEYS[FIXED_KEYS + rk],
        '{"status":"done","finished_at":' .. now .. ',"result":' .. result .. '}', 'PX', ttl)
    end
    done = done + 1
    handed_off = handed_off + handoffs
  else
    stale[#stale + 1] = id
  end
end
if done > 0 then redis.call('HINCRBY', K_STATS, 'done', done) end
if handed_off > 0 then redis.call('HINCRBY', K_STATS, 'handed_off', handed_off) end
if #stale > 0 then redis.call('HINCRBY', K_STATS, 'stale_acks', #stale) end
return stale
