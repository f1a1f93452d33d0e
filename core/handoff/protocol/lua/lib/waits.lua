-- waits: a Wait's parked then-task, and resuming it (signal, timeout)
-- Included by the scripts that list it on their `-- include:` line (scripts.py puts the
-- included files, in the order of lib/ORDER, after the key header and before the body).

local function wait_tail(json)
  -- Waits (handoff/protocol/waits.py). A Wait's then-task is parked in its agent's slot: its
  -- JSON in the tasks hash (its "wait" object last: wait_tail), its id in <base>:waiting
  -- (id -> when it times out, ms), in no queue. Exactly one of its signal, its timeout and
  -- its cancel takes it out of that set (ZREM decides, in one script on this slot).
  -- (A function, not a constant: only the scripts that call it carry it.)
  return string.match(json, ',"wait":{"event":"([^"]*)","on_timeout":"(%a+)","since":(%d+)[^{}]*}}$')
end

-- A parked then-task becomes ready: `woke` (the signal's data, or the timeout) is
-- appended to its JSON, where its worker reads it as task.event / task.timed_out. Its run
-- cancelled meanwhile: it ends cancelled, never queued. Returns true if it was queued.
local function resume_waiting(id, woke, now)
  local json = redis.call('HGET', K_TASKS, id)
  if not json or redis.call('ZSCORE', K_DEAD, id) then return false end
  local until_ms = marked(string.match(json, RUN_OF), now)
  if until_ms then
    end_cancelled(id, now, until_ms - now, json)
    forget(id)
    return false
  end
  local score, bad = score_in(redis.call('HGET', K_SCORES, id), id)
  if not score then  -- someone overwrote its stored place: dead-lettered, naming it
    bury_corrupt(id, now, K_SCORES, bad)
    return false
  end
  redis.call('HSET', K_TASKS, id, string.sub(json, 1, -2) .. ',"woke":' .. woke .. '}')
  local group = string.match(json, GROUP_OF_JSON)
  if group then group_set(id, group) end
  ready_add(id, score, group)
  local expires = string.match(json,
    '^{"id":"[^"]*","agent":"[^"]*","run":"[^"]*","scope":"[^"]*","branch":%d+,"expires_at":(%d+)')
  if expires then redis.call('HSET', K_DEADLINES, id, expires) end
  count('resumed', 1)
  wake(1)
  return true
end
