-- wait: park the then-tasks of Waits in this agent's slot until their event or timeout.
-- include: base, groups, tasks, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- KEYS[FIXED_KEYS + 1]  <base>:waiting   KEYS[FIXED_KEYS + 2]  <base>:wait_outbox
-- KEYS[FIXED_KEYS + 3]  <base>:waiting_since (the same ids, by when parked: in step with
--   waiting in every script that adds to it or takes from it)
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2] max payload bytes
-- then groups of 6: id, score, task_json (its "wait" object last), due (ms: its timeout or
--   its run's deadline, the earlier; 'inf' = never), event, since (ms: its wait's "since")
-- A parked task is written with a wait_outbox entry (id -> now SEP event SEP due) in this
-- same script: its registration with the event's slot (wait_register.lua) is owed, and the
-- caller (or, should it crash, a supervisor's tick) delivers it, then forgets the entry.
-- Idempotent by id: a task already stored, or finished within its dedupe window, is a
-- duplicate (a Wait returned again by a parent run again). A task of a cancelled run (or
-- of a cancelled parent) ends cancelled at once.
-- Returns: per task 1 = parked, 0 = duplicate, 2 = ended cancelled; then, if a cancelled
-- task's end went to another slot, '|' and outbox field/notice pairs to deliver.
local K_WAITING, K_WAIT_OUTBOX = KEYS[FIXED_KEYS + 1], KEYS[FIXED_KEYS + 2]
local K_WAITING_SINCE = KEYS[FIXED_KEYS + 3]
local now = now_ms(ARGV[1])
local max_bytes = tonumber(ARGV[2])
local out = {}
for o = 3, #ARGV, 6 do
  local id, score, json, due, event = ARGV[o], ARGV[o + 1], ARGV[o + 2], ARGV[o + 3], ARGV[o + 4]
  local since = tonumber(ARGV[o + 5]) or now
  if #json > max_bytes then
    return redis.error_reply('ERR task ' .. id .. ' is ' .. #json .. ' bytes, over the limit of ' ..
      max_bytes .. ' bytes')
  end
  local duplicate = redis.call('HEXISTS', K_TASKS, id) == 1
  if not duplicate then
    local until_ms = redis.call('ZSCORE', K_FINISHED, id)
    duplicate = until_ms and tonumber(until_ms) > now
  end
  local cancelled_until
  if not duplicate then
    cancelled_until = marked(string.match(json, RUN_OF), now) or
      marked(string.match(json, '"parent_id":"([^"]*)"'), now)
  end
  if duplicate then
    out[#out + 1] = 0
  elseif cancelled_until then
    end_cancelled(id, now, cancelled_until - now, json)
    out[#out + 1] = 2
  else
    redis.call('HSET', K_TASKS, id, json)
    redis.call('HSET', K_SCORES, id, score)
    redis.call('ZADD', K_WAITING, due == 'inf' and '+inf' or due, id)
    redis.call('ZADD', K_WAITING_SINCE, since, id)
    redis.call('HSET', K_WAIT_OUTBOX, id, now .. SEP .. event .. SEP .. due)
    count('waits', 1)
    out[#out + 1] = 1
  end
end
return with_outboxed(out)
