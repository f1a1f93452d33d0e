-- ack: finish a batch of leased tasks, token-checked, atomically.
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (see _prelude.lua)
-- KEYS[FIXED_KEYS + 1..]  result keys, by index
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2] result TTL ms (0 = keep no result)
-- ARGV[3] n, then n groups of 6: id, token, result_json ('' = null), result_key_index,
--   handoffs, dedupe window ms (0 = none: a task with neither a key nor a parent)
-- A task whose token no longer matches (its lease expired and another worker holds it, or it
-- already finished, or it appears earlier in this batch) is left exactly as it is and
-- reported. The bookkeeping of finished tasks is deleted in bulk commands per batch. A
-- result the server will not store is reported, and the task is finished all the same.
-- Returns: {stale ids..., ['|', id, error, id, error, ...] for results not stored}.
local now = now_ms(ARGV[1])
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local ids = {}
for i = 1, n do ids[i] = ARGV[3 + (i - 1) * 6 + 1] end
local holders = hget_each(K_TOKENS, ids)
local stale, finished, seen, remembered, dropped = {}, {}, {}, {}, {}
local handed_off = 0
for i = 1, n do
  local o = 3 + (i - 1) * 6
  local id, token = ARGV[o + 1], ARGV[o + 2]
  if holders[i] == token and not seen[id] then
    seen[id] = true
    finished[#finished + 1] = id
    local rk = tonumber(ARGV[o + 4])
    if ttl > 0 and rk > 0 then
      local result = ARGV[o + 3]
      if result == '' then result = 'null' end
      local reply = redis.pcall('SET', KEYS[FIXED_KEYS + rk],
        '{"status":"done","finished_at":' .. now .. ',"result":' .. result .. '}', 'PX', ttl)
      if type(reply) == 'table' and reply.err then
        dropped[#dropped + 1] = id
        dropped[#dropped + 1] = reply.err
      end
    end
    handed_off = handed_off + tonumber(ARGV[o + 5])
    local window = tonumber(ARGV[o + 6])
    if window > 0 then push2(remembered, now + window, id) end
  else
    stale[#stale + 1] = id
  end
end
if #finished > 0 then
  bulk_call('ZREM', K_LEASES, finished)
  forget_all(finished)
end
bulk_write('ZADD', K_FINISHED, remembered)
count('done', #finished)
count('handed_off', handed_off)
count('stale_acks', #stale)
count('results_dropped', #dropped / 2)
if #dropped > 0 then
  stale[#stale + 1] = '|'
  for _, item in ipairs(dropped) do stale[#stale + 1] = item end
end
return stale
