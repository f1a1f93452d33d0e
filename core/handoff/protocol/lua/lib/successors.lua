-- successors: a repeated key's next task: told, stopped, its old end cleared, promoted
-- Included by the scripts that list it on their `-- include:` line (scripts.py puts the
-- included files, in the order of lib/ORDER, after the key header and before the body).

-- A key's task id comes from the key, so one id carries the key's tasks one after the
-- other (handoff/protocol/conflict.py). While one is leased, conflict.lua keeps the next
-- as its successor (K_SUCCESSORS, lib/tasks.lua). When the leased one ends for good (done,
-- dead, cancelled, expired: ended_for_good), the successor takes the id at the end of that
-- same call: promote_ended, called last by the scripts that end a client's tasks (ack,
-- nack, release, reap, claim). A task under a key is a client's root, never a join's
-- then-task or a Wait's, the only tasks the other scripts end. A lease lost (reaped,
-- released, failed and retried) is no end: the successor waits on.

-- Tell the worker holding a leased task that it was cancelled: its inbox (named by the
-- claim tag its token starts with) gets 'id|token|seq|answers' (runtime/inbox.py), the
-- sequence number unique and increasing, even after its key expired (from the clock, in
-- microseconds). Returns true if the task has a holder to tell.
local function tell_holder(id, now, answers)
  local holder = redis.call('HGET', K_TOKENS, id) or ''
  local tag = string.match(holder, '^(%w+)%-')
  if not tag then return false end
  local inbox = run_key('inbox', tag)
  local seq_key = run_key('inbox_seq', tag)
  local seq = math.max(now * 1000, (tonumber(redis.call('GET', seq_key) or '0') or 0) + 1)
  seq = string.format('%.0f', seq)
  redis.call('SET', seq_key, seq, 'PX', 7 * 86400000)
  redis.call('RPUSH', inbox, id .. '|' .. holder .. '|' .. seq .. '|' .. answers)
  redis.call('PEXPIRE', inbox, 7 * 86400000)  -- as long as its seq: a stopped worker
  return true
end

-- A leased task its successor cancelled (mode 'c') lets go of its lease: its worker
-- released it once its handler ended (or never started it), it failed, or its lease ran
-- out. It ends cancelled (ended_for_good, in end_cancelled), and the successor follows.
stop_lease = function(id, now)
  if redis.call('ZREM', K_LEASES, id) == 1 then lease_ended(id) end
  redis.call('HDEL', K_TOKENS, id)
  end_cancelled(id, now, 60000, redis.call('HGET', K_TASKS, id) or '')
  forget(id)
end

-- A cancel drops the successor with the task it cancels (the key's work is cancelled).
local function drop_successor(id)
  if successor_of(id) then
    redis.call('HDEL', K_SUCCESSORS, id)
    count('successors_dropped', 1)
  end
end

-- What an old end leaves under an id that a new task there must not inherit: its record
-- and end notices (client.result then waits for the new task: a waiter stays watched), its
-- refusal as a duplicate, its dead letter and counts, its steps and messages, and its run
-- once that has ended (a run still open takes the new task in: its end is counted there
-- too). Returns true if the id was marked cancelled in this slot (the mark goes: the
-- caller lifts it in the other slots, rerun.lift_marks).
local function clear_end(id, now)
  local done = run_key('done', id)
  if redis.call('EXISTS', done) == 1 or redis.call('ZSCORE', WATCHED, id) then
    redis.call('ZADD', WATCHED, 'GT', now + 310000, id)  -- (WAIT_CHUNK_S + 10 s)
  end
  redis.call('DEL', run_key('result', id), done, run_key('steps', id), run_key('msgs', id))
  redis.call('ZREM', K_FINISHED, id)
  if redis.call('ZREM', K_DEAD, id) == 1 then redis.call('HDEL', K_DEAD_REASONS, id) end
  redis.call('HDEL', K_DELIVERIES, id)
  redis.call('HDEL', K_FAILURES, id)
  local sk = run_key('scope', id)
  local kind = redis.call('TYPE', sk).ok
  if kind == 'hash' and redis.call('HEXISTS', sk, 'done') == 0 then
    if redis.call('HGET', sk, 't:' .. id) ~= '1' then
      redis.call('HSET', sk, 't:' .. id, '1')
      redis.call('HINCRBY', sk, 'n', 1)
    end
    redis.call('ZADD', WATCHED, '+inf', id)  -- its ack reports its end to the run
  elseif kind ~= 'none' then
    redis.call('DEL', sk, run_key('ends', id), run_key('ended', id), run_key('stream', id))
  else
    redis.call('DEL', run_key('ended', id), run_key('stream', id))
  end
  return redis.call('ZREM', K_CANCELLED, id) == 1
end

-- The successor takes the id: stored (its old end cleared first), ready by its score or
-- delayed by its delay from now; a debounce burst starts now (its JSON's "burst_at").
local function promote(id, value, now)
  local _, delay, until_ms, score, json = string.match(value,
    '^(%a)|(%d+)|(%d+)|(%-?%d+)|(.*)$')
  if not json or string.sub(json, 1, 7) ~= '{"id":"' then
    count('corrupt', 1)
    return
  end
  if tonumber(until_ms) <= now then
    count('successors_expired', 1)
    return
  end
  clear_end(id, now)
  json = string.gsub(json, ',"burst_at":%d+}$', ',"burst_at":' .. string.format('%.0f', now) .. '}')
  redis.call('HSET', K_TASKS, id, json)
  redis.call('HSET', K_SCORES, id, score)
  local group = string.match(json, GROUP_OF_JSON)
  if group then group_set(id, group) else redis.call('HDEL', K_TASK_GROUPS, id) end
  redis.call('HDEL', K_DEADLINES, id)
  local expires = string.match(json, '^{"id":"[^"]*","agent":"[^"]*","expires_at":(%d+)')
  if expires then redis.call('HSET', K_DEADLINES, id, expires) end
  if tonumber(delay) > 0 then
    redis.call('ZADD', K_DELAYED, now + tonumber(delay), id)
  else
    ready_add(id, score, group)
    wake(1)
  end
  count('enqueued', 1)
  count('successors_promoted', 1)
end

-- Promote the successors of the tasks that ended for good in this call (ENDED). Called
-- last, after the script's own writes on those ids (an ack forgets its tasks in bulk).
local function promote_ended(now)
  for i, id in ipairs(ENDED) do
    ENDED[i] = nil
    local value = redis.call('HGET', K_SUCCESSORS, id)
    if value then
      redis.call('HDEL', K_SUCCESSORS, id)
      promote(id, value, now)
    end
  end
end
