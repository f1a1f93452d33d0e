-- release: give leased tasks back unstarted (graceful shutdown), or rate limited by the API
-- include: base, groups, tasks, scopes, notices, successors
-- their handler called (RateLimited), token-checked, atomically.
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- ARGV[1] pause ms (0 = none): the agent type starts nothing anywhere for this long; for a
--   task with a group, only its group (it is parked until then)
-- ARGV[2] n, then n groups of 2: id, token
-- The delivery is not counted (nor is a failure) and the task returns to its place. A task
-- a key's successor cancelled (cancel_running) ends cancelled here and the successor
-- takes its id: its worker releases it once its handler has ended (lib/successors.lua).
-- Returns: the number released.
local pause_ms = tonumber(ARGV[1]) or 0
local n = tonumber(ARGV[2])
local now = now_ms('')
local until_ms = now + pause_ms
local function pause(key)
  standing(key, 'hash')
  if until_ms > (tonumber(redis.call('HGET', key, 'paused_until') or '0') or 0) then
    redis.call('HSET', key, 'paused_until', until_ms)
  end
end
local released = 0
for i = 0, n - 1 do
  local id, token = ARGV[3 + i * 2], ARGV[4 + i * 2]
  local holds = redis.call('HGET', K_TOKENS, id) == token
  if holds and stopping(id) then
    stop_lease(id, now)  -- its worker let go of a task a key's successor cancelled
  elseif holds then
    local delivered, why = count_in('deliveries', redis.call('HGET', K_DELIVERIES, id), id)
    redis.call('ZREM', K_LEASES, id)
    local group = group_of(id)
    if pause_ms > 0 and group then  -- the group waits; the others go on
      local gl = run_key('glimit', group)
      pause(gl)
      redis.call('PEXPIRE', gl, math.max(60000, pause_ms * 2))
      redis.call('ZREM', K_GROUPS, group)
      redis.call('ZADD', K_PARKED, 'GT', until_ms, group)
    elseif pause_ms > 0 then
      pause(K_LIMITS)
    end
    lease_ended(id)
    redis.call('HDEL', K_TOKENS, id)
    if not delivered then
      bury_corrupt(id, now, K_DELIVERIES, why)
    else
      redis.call('HSET', K_DELIVERIES, id, math.max(0, delivered - 1))
      if requeue(id, now) then released = released + 1 end
    end
  end
end
promote_ended(now)
wake(released)
return released
