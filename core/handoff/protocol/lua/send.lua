-- send: append a message to a task's messages (task.receive reads them).
-- include: 
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- KEYS[FIXED_KEYS + 1]  <base>:msgs:<id>, the task's messages (a STREAM, in its slot)
-- ARGV[1] the task id   ARGV[2] the message (JSON)   ARGV[3] how long the messages live
--   after the last one, ms   ARGV[4] at most this many kept (the oldest go first)
-- Only a task that still exists (queued, delayed, waiting, running) takes messages; they
-- outlive it by ARGV[3] and go with it (an entry per message, read from the first by each
-- delivery of the task: a task run again after a crash sees them all again, in order).
-- Returns: {'sent', entry id} or {state}: done | cancelled | expired | dead | unknown.
local MSGS = KEYS[FIXED_KEYS + 1]
local id = ARGV[1]
if redis.call('HEXISTS', K_TASKS, id) == 0 or redis.call('ZSCORE', K_DEAD, id) then
  if redis.call('ZSCORE', K_DEAD, id) then return {'dead'} end
  local record = redis.call('GET', run_key('result', id))
  if record then return {string.match(record, '^{"status":"(%a+)"') or 'done'} end
  return {'unknown'}
end
local entry = redis.call('XADD', MSGS, 'MAXLEN', '~', ARGV[4], '*', 'm', ARGV[2])
redis.call('PEXPIRE', MSGS, ARGV[3])
return {'sent', entry}
