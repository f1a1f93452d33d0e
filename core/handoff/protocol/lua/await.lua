-- await: a task's own end, for client.result; registers a waiter if it has not ended.
-- include: base, groups, tasks, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the task's agent's fixed keys (see lua/lib/)
-- ARGV[1] the task id   ARGV[2] how long the waiter flag lives, ms
-- Returns one of:
--   {'done', record_json}     finished: its record (result, and the tree's fields)
--   {'dead', reason_json}     dead-lettered
--   {'wait'}                  queued, delayed or running: block on <base>:done:<id>, which
--                             its ack (or its burial) pushes to (WATCHED, lua/lib/*.lua)
--   {'unknown'}               no such task (never enqueued, or its record is gone)
local id = ARGV[1]
local record = redis.call('GET', run_key('result', id))
if record then return {'done', record} end
if redis.call('ZSCORE', K_DEAD, id) then
  return {'dead', redis.call('HGET', K_DEAD_REASONS, id) or '{}'}
end
if redis.call('HEXISTS', K_TASKS, id) == 0 then return {'unknown'} end
local now = now_ms('')
redis.call('ZREMRANGEBYSCORE', WATCHED, '-inf', now)  -- waiters gone (never +inf marks)
local until_ms = now + tonumber(ARGV[2])
if until_ms > tonumber(redis.call('ZSCORE', WATCHED, id) or '0') then
  redis.call('ZADD', WATCHED, until_ms, id)
end
return {'wait'}
