-- wait_tick: a supervisor's tick over this agent's waits: timeouts fire, owed
-- include: base, groups, tasks, scopes, notices, successors, waits
-- registrations are handed back. No leader: a timeout fires once (ZREM decides), from
-- whichever tick comes first after it is due.
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- KEYS[FIXED_KEYS + 1]  <base>:waiting   KEYS[FIXED_KEYS + 2]  <base>:wait_outbox
-- KEYS[FIXED_KEYS + 3]  <base>:waiting_since (in step with waiting: see wait.lua)
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2] at most this many per call
-- ARGV[3] grace ms: registrations owed longer than this were not delivered by the worker
--   that parked them (it died): returned for the caller to deliver
-- ARGV[4] how long an expired task's record lives, ms
-- A due wait whose run deadline passed ends expired; else on_timeout 'continue' queues
-- its then-task with task.timed_out, 'fail' dead-letters it naming the event and the time
-- waited. A parked task gone meanwhile (cancelled) is only forgotten here.
-- Returns: {fired, n, n pairs of id and 'event SEP due' (registrations owed), then, if ends went
-- to another slot, '|' and outbox field/notice pairs to deliver}
local K_WAITING, K_WAIT_OUTBOX = KEYS[FIXED_KEYS + 1], KEYS[FIXED_KEYS + 2]
local K_WAITING_SINCE = KEYS[FIXED_KEYS + 3]
local now = now_ms(ARGV[1])
local limit = tonumber(ARGV[2])
local grace = tonumber(ARGV[3])
local record_ttl = tonumber(ARGV[4])
local fired = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_WAITING, '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', K_WAITING, id)
  redis.call('ZREM', K_WAITING_SINCE, id)
  redis.call('HDEL', K_WAIT_OUTBOX, id)
  local json = redis.call('HGET', K_TASKS, id)
  if json and not redis.call('ZSCORE', K_DEAD, id) then
    fired = fired + 1
    local event, on_timeout, since = wait_tail(json)
    local expires = tonumber(string.match(json,
      '^{"id":"[^"]*","agent":"[^"]*","run":"[^"]*","scope":"[^"]*","branch":%d+,"expires_at":(%d+)')
      or '')
    if expires and expires <= now then
      expire(id, now, expires, record_ttl)
    elseif on_timeout == 'continue' then
      resume_waiting(id, '{"event":null,"timed_out":true}', now)
    else
      local waited = (now - (tonumber(since) or now)) / 1000
      bury(id, now, cjson.encode({reason = string.format(
        "wait for event '%s' timed out after %.1f s", event or '?', waited), at = now}))
    end
  end
end
local out = {fired, 0}
if redis.call('TYPE', K_WAIT_OUTBOX).ok == 'hash' then
  local flat = redis.call('HSCAN', K_WAIT_OUTBOX, 0, 'COUNT', limit)[2]
  for i = 1, #flat, 2 do
    local at = string.find(flat[i + 1], SEP, 1, true)
    if at and (tonumber(string.sub(flat[i + 1], 1, at - 1)) or 0) < now - grace then
      out[#out + 1] = flat[i]
      out[#out + 1] = string.sub(flat[i + 1], at + 1)
      out[2] = out[2] + 1
    end
  end
end
return with_outboxed(out)
