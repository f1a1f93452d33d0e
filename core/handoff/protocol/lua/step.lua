-- step: store one memoized step result of a running task, only while its lease holds.
-- include: base
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- KEYS[FIXED_KEYS + 1] the task's steps hash (keys.steps: name -> stored step)
-- ARGV[1] task id   ARGV[2] this delivery's lease token   ARGV[3] step name
-- ARGV[4] the stored step ('{"ms":..,"delivery":..,"result":..}')
-- ARGV[5] TTL ms of the steps hash (the task record's; 0 = no expiry)
-- A delivery whose token no longer matches (its lease expired and another delivery holds
-- the task, or the task already finished) writes nothing: as a stale ack. A name already
-- stored keeps its first value (two deliveries cannot both hold the lease, but a repeat
-- of this call after a lost reply must not count twice).
-- Returns: 1 stored, 2 already stored (the value kept is returned after it), 0 stale.
local steps = KEYS[FIXED_KEYS + 1]
local id, token, name = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', K_TOKENS, id) ~= token then
  count('stale_steps', 1)
  return {0}
end
if redis.call('TYPE', steps).ok ~= 'hash' and redis.call('EXISTS', steps) == 1 then
  redis.call('DEL', steps)  -- overwritten with another type: what it held is gone
  count('corrupt', 1)
end
if redis.call('HSETNX', steps, name, ARGV[4]) == 0 then
  return {2, redis.call('HGET', steps, name)}
end
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('PEXPIRE', steps, ttl) end
count('steps_stored', 1)
return {1}
