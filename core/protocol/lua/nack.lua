-- nack: a batch of leased tasks failed; retry later or dead-letter, token-checked, atomically.
-- KEYS[1..12]  the agent's fixed keys (see _prelude.lua)
-- ARGV[1] now in ms ('' = server TIME)
-- ARGV[2] n, then n groups of 5: id, token, max_attempts, retry_delay_ms, reason_json
--   retry_delay_ms < 0 means dead-letter now (corrupt task, hop limit, ...).
-- A failure counts one attempt; at max_attempts the task is dead-lettered with the reason,
-- otherwise it waits in the delayed set (the caller computed backoff and jitter).
-- Returns: {stale ids..., '|', dead ids...}
local now = now_ms(ARGV[1])
local n = tonumber(ARGV[2])
local stale, dead = {}, {}
local failed, retried = 0, 0
for i = 0, n - 1 do
  local o = 2 + i * 5
  local id, token, max_attempts, delay_ms, reason = ARGV[o + 1], ARGV[o + 2], tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4]), ARGV[o + 5]
  if redis.call('HGET', K_TOKENS, id) == token then
    failed = failed + 1
    local attempts = redis.call('HINCRBY', K_FAILURES, id, 1)
    if delay_ms < 0 or attempts >= max_attempts then
      bury(id, now, reason)
      dead[#dead + 1] = id
    else
      redis.call('ZREM', K_LEASES, id)
      redis.call('HDEL', K_TOKENS, id)
      redis.call('ZADD', K_DELAYED, now + delay_ms, id)
      retried = retried + 1
    end
  else
    stale[#stale + 1] = id
  end
end
if failed > 0 then redis.call('HINCRBY', K_STATS, 'failed', failed) end
if retried > 0 then redis.call('HINCRBY', K_STATS, 'retried', retried) end
if #stale > 0 then redis.call('HINCRBY', K_STATS, 'stale_acks', #stale) end
stale[#stale + 1] = '|'
for _, id in ipairs(dead) do stale[#stale + 1] = id end
return stale
