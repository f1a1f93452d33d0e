-- tasks: a task's moves between states: dead-letter, requeue, forget, reap, promote, wake
-- Included by the scripts that list it on their `-- include:` line (scripts.py puts the
-- included files, in the order of lib/ORDER, after the key header and before the body).

-- Reports a dead-lettered task's end to its scope (defined with the runs helpers below).
local notice_dead

-- A repeated key's successor (handoff/protocol/conflict.py): the task that takes a key's id
-- once the task holding it has ended for good. <base>:successors HASH id ->
-- 'mode|delay_ms|until_ms|score|json': mode 'r' waits for the task to end, 'c' cancelled it
-- (cancel_running: its handler was told, and it ends cancelled once its worker lets go of
-- it). Looked at only when the hash exists (the hot path: one EXISTS per call).
local K_SUCCESSORS = run_key('successors', 'keys')
local SUCCESSORS  -- nil until looked at
local ENDED = {}  -- ids that ended for good in this call with a successor waiting
local function successor_of(id)
  if SUCCESSORS == nil then SUCCESSORS = redis.call('EXISTS', K_SUCCESSORS) == 1 end
  if not SUCCESSORS then return nil end
  return redis.call('HGET', K_SUCCESSORS, id) or nil
end

-- A task ended for good (done, dead, cancelled, expired): its successor, if one waits,
-- takes the id at the end of this call (promote_ended, lib/successors.lua).
local function ended_for_good(id)
  if successor_of(id) then ENDED[#ENDED + 1] = id end
end

-- Whether a cancel_running successor cancelled this leased task (mode 'c').
local function stopping(id)
  local waiting = successor_of(id)
  return waiting ~= nil and string.sub(waiting, 1, 1) == 'c'
end

-- Ends a leased task its successor cancelled (defined with the successors).
local stop_lease

-- Dead-letter a task: kept with its payload and the reason, out of every other state.
local function bury(id, now, reason_json)
  notice_dead(id, now, reason_json)
  if redis.call('ZREM', K_LEASES, id) == 1 then lease_ended(id) end
  redis.call('HDEL', K_TOKENS, id)
  redis.call('ZADD', K_DEAD, now, id)
  redis.call('HSET', K_DEAD_REASONS, id, reason_json)
  count('dead', 1)
  ended_for_good(id)
end

-- Dead-letter a task whose bookkeeping field `key` held garbage (`why` names it). The
-- field goes: a requeue from the dead letters starts the task afresh.
local function bury_corrupt(id, now, key, why)
  redis.call('HDEL', key, id)
  bury(id, now, cjson.encode({reason = why, at = now}))
  count('corrupt', 1)
end

-- Put a task back in the ready queue at its original place (its stored score). Returns
-- false when the score was corrupt and the task was dead-lettered instead.
local function requeue(id, now)
  local score, why = score_in(redis.call('HGET', K_SCORES, id), id)
  if not score then
    bury_corrupt(id, now, K_SCORES, why)
    return false
  end
  ready_add(id, score)
  return true
end

-- Forget a finished task's bookkeeping (the payload too).
local function forget(id)
  redis.call('HDEL', K_DEADLINES, id)
  redis.call('HDEL', K_TASKS, id)
  redis.call('HDEL', K_TOKENS, id)
  redis.call('HDEL', K_DELIVERIES, id)
  redis.call('HDEL', K_FAILURES, id)
  redis.call('HDEL', K_SCORES, id)
  if group_of(id) then redis.call('HDEL', K_TASK_GROUPS, id) end
end

-- Move leases that expired before `now` back to the queue; bounded by `limit`. Returns
-- how many were queued again. One a cancel_running successor waits for ends cancelled.
local function reap_expired(now, limit)
  if limit <= 0 then return 0 end
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, limit)
  local queued = 0
  for _, id in ipairs(expired) do
    redis.call('ZREM', K_LEASES, id)
    lease_ended(id)
    redis.call('HDEL', K_TOKENS, id)
    if stopping(id) then
      stop_lease(id, now)
    elseif requeue(id, now) then
      queued = queued + 1
    end
  end
  count('reaped', #expired)
  return queued
end

-- Move delayed tasks that are due to the queue; bounded by `limit`. Returns how many.
local function promote_due(now, limit)
  if limit <= 0 then return 0 end
  local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', now, 'LIMIT', 0, limit)
  local queued = 0
  for _, id in ipairs(due) do
    redis.call('ZREM', K_DELAYED, id)
    if requeue(id, now) then queued = queued + 1 end
  end
  return queued
end

-- Forget finished ids whose dedupe window has passed; bounded by `limit`.
local function expire_finished(now, limit)
  if limit <= 0 then return end
  local passed = redis.call('ZRANGEBYSCORE', K_FINISHED, '-inf', now, 'LIMIT', 0, limit)
  if #passed > 0 then redis.call('ZREM', K_FINISHED, unpack(passed)) end
end

-- The dead tasks a dead-letter operation works on: ARGV[1] limit, ARGV[2..] ids (none =
-- the oldest `limit`).
local function dead_selection(argv)
  if #argv > 1 then
    local ids = {}
    for i = 2, #argv do ids[#ids + 1] = argv[i] end
    return ids
  end
  return redis.call('ZRANGE', K_DEAD, 0, tonumber(argv[1]) - 1)
end

-- Wake up to n idle workers blocked on the wake list (BLPOP). Tokens are hints, not
-- work: a spurious wake-up costs one empty claim. The list is bounded.
local function wake(n)
  if n <= 0 then return end
  local tokens = {}
  for i = 1, math.min(n, 64) do tokens[i] = '1' end
  if redis.call('LPUSH', K_WAKE, unpack(tokens)) > 128 then  -- (LPUSH says the length)
    redis.call('LTRIM', K_WAKE, 0, 127)
  end
end
