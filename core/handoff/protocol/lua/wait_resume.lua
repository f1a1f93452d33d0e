-- wait_resume: a signal reaches waits parked in this agent's slot (see wait.lua).
-- include: base, groups, tasks, scopes, notices, successors, waits
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- KEYS[FIXED_KEYS + 1]  <base>:waiting   KEYS[FIXED_KEYS + 2]  <base>:wait_outbox
-- KEYS[FIXED_KEYS + 3]  <base>:waiting_since (in step with waiting: see wait.lua)
-- ARGV[1] now in ms ('' = server TIME), then pairs: then-task id, the signal's data (JSON)
-- A wait resumes only if it is still parked (ZREM decides): its then-task is queued with
-- the data (resume_waiting in lua/lib/). One already resumed, timed out, cancelled or
-- unknown is left as it is: a resume delivered twice (the signaller, and a tick after
-- it) resumes once. Its registration is owed no more (its wait_outbox entry goes).
-- Returns: per pair 1 = resumed, 0 = not; then, if a cancelled task's end went to another
-- slot, '|' and outbox field/notice pairs to deliver.
local K_WAITING, K_WAIT_OUTBOX = KEYS[FIXED_KEYS + 1], KEYS[FIXED_KEYS + 2]
local K_WAITING_SINCE = KEYS[FIXED_KEYS + 3]
local now = now_ms(ARGV[1])
local out = {}
for o = 2, #ARGV, 2 do
  local id = ARGV[o]
  local resumed = 0
  if redis.call('ZREM', K_WAITING, id) == 1 then
    redis.call('ZREM', K_WAITING_SINCE, id)
    redis.call('HDEL', K_WAIT_OUTBOX, id)
    if resume_waiting(id, '{"event":' .. ARGV[o + 1] .. '}', now) then resumed = 1 end
  end
  out[#out + 1] = resumed
end
return with_outboxed(out)
