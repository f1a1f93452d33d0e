-- claim: lease up to n ready tasks of one agent type, atomically, in one call.
-- KEYS[1..12]  the agent's fixed keys (see _prelude.lua)
-- KEYS[13]     this claim's replay key (LIST of the ids it leased)
-- ARGV[1] n (capped at ARGV[7])   ARGV[2] lease_ms      ARGV[3] claim_id (the lease token)
-- ARGV[4] max_deliveries          ARGV[5] global_limit (0 = none)
-- ARGV[6] now in ms ('' = server TIME)                    ARGV[7] cap on n
-- ARGV[8] promote/reap bound per call
-- Steps: replay a claim whose reply was lost (same claim_id -> same batch, no second lease);
-- promote due delayed tasks; reap expired leases; pop up to n by score; dead-letter any task
-- delivered more than max_deliveries times without finishing; lease the rest with the token
-- and a deadline from server time; count the delivery.
-- Returns: {now, next_due (ms of the earliest delayed task, -1 if none),
--           id1, json1, attempt1, deliveries1, id2, ...}
local claim_key = KEYS[FIXED_KEYS + 1]
local n = math.min(tonumber(ARGV[1]), tonumber(ARGV[7]))
local lease_ms = tonumber(ARGV[2])
local token = ARGV[3]
local max_deliveries = tonumber(ARGV[4])
local global_limit = tonumber(ARGV[5])
local now = now_ms(ARGV[6])
local bound = tonumber(ARGV[8])
local out = {now, -1}

local function emit(id)
  local json = redis.call('HGET', K_TASKS, id)
  local attempts = tonumber(redis.call('HGET', K_ATTEMPTS, id) or '0')
  local deliveries = tonumber(redis.call('HGET', K_DELIVERIES, id) or '0')
  out[#out + 1] = id
  out[#out + 1] = json
  out[#out + 1] = attempts + 1
  out[#out + 1] = deliveries
end

-- A retried claim: return what the first call leased and still holds; lease nothing new.
if redis.call('EXISTS', claim_key) == 1 then
  for _, id in ipairs(redis.call('LRANGE', claim_key, 0, -1)) do
    if redis.call('HGET', K_TOKENS, id) == token then emit(id) end
  end
  return out
end

wake(promote_due(now, bound) + reap_expired(now, bound))
local head = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
if #head > 0 then out[2] = tonumber(head[2]) end

if global_limit > 0 then
  n = math.min(n, global_limit - redis.call('ZCARD', K_LEASES))
end
if n <= 0 then return out end

local popped = redis.call('ZPOPMIN', K_QUEUE, n)
local leased = {}
local deadline = now + lease_ms
for i = 1, #popped, 2 do
  local id = popped[i]
  if redis.call('HEXISTS', K_TASKS, id) == 0 then
    -- A queue entry with no payload: nothing to run, nothing to lose. Count it and move on.
    redis.call('HINCRBY', K_STATS, 'orphans', 1)
    redis.call('HDEL', K_SCORES, id)
  else
    local deliveries = redis.call('HINCRBY', K_DELIVERIES, id, 1)
    local failures = tonumber(redis.call('HGET', K_ATTEMPTS, id) or '0')
    if deliveries - failures > max_deliveries then
      bury(id, now, '{"reason":"poison: delivered ' .. (deliveries - 1 - failures) ..
        ' times without finishing (worker crashed or lease expired each time)","at":' .. now .. '}')
    else
      redis.call('ZADD', K_LEASES, deadline, id)
      redis.call('HSET', K_TOKENS, id, token)
      leased[#leased + 1] = id
      emit(id)
    end
  end
end
if #leased > 0 then
  redis.call('RPUSH', claim_key, unpack(leased))
  redis.call('PEXPIRE', claim_key, lease_ms)
end
return out
