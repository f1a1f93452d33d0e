-- release: give leased tasks back unstarted (graceful shutdown), token-checked, atomically.
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (see _prelude.lua)
-- ARGV[1] n, then n groups of 2: id, token
-- The delivery is not counted (the task never ran) and the task returns to its place.
-- Returns: the number released.
local n = tonumber(ARGV[1])
local now = now_ms('')
local released = 0
for i = 0, n - 1 do
  local id, token = ARGV[2 + i * 2], ARGV[3 + i * 2]
  if redis.call('HGET', K_TOKENS, id) == token then
    local delivered, why = count_in('deliveries', redis.call('HGET', K_DELIVERIES, id), id)
    redis.call('ZREM', K_LEASES, id)
    redis.call('HDEL', K_TOKENS, id)
    if not delivered then
      bury_corrupt(id, now, K_DELIVERIES, why)
    else
      redis.call('HSET', K_DELIVERIES, id, math.max(0, delivered - 1))
      if requeue(id, now) then released = released + 1 end
    end
  end
end
wake(released)
return released
