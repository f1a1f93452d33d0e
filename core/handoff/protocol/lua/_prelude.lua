-- Shared by every script (prepended at load time, after the key header that
-- scripts.py generates from keys.py AGENT_KEY_NAMES: `local K_QUEUE, ... = KEYS[1], ...`
-- and FIXED_KEYS). Every key of one agent type shares the hash tag {agent}, so each
-- script touches one cluster slot.

-- Server time in ms, unless the caller passed one (tests drive a virtual clock).
local function now_ms(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Add n to a counter in the stats hash. Counting is never why a script fails: a counter
-- someone overwrote with text starts again from n.
local function count(field, n)
  if n == 0 then return end
  local reply = redis.pcall('HINCRBY', K_STATS, field, n)
  if type(reply) == 'table' and reply.err then redis.pcall('HSET', K_STATS, field, n) end
end

-- An agent's standing key (outbox, limits, group counts, a group's limiter) that someone
-- overwrote with another type holds nothing a script can read: it goes, counted as
-- corrupt, and what it held starts again. True if it went.
local function standing(key, kind)
  local was = redis.call('TYPE', key).ok
  if was == kind or was == 'none' then return false end
  redis.call('DEL', key)
  count('corrupt', 1)
  return true
end

-- HINCRBY on a standing hash that an overwritten field or key does not stop: the field
-- starts again from n (counted as corrupt).
local function incr(key, field, n)
  local reply = redis.pcall('HINCRBY', key, field, n)
  if type(reply) ~= 'table' then return reply end
  if not standing(key, 'hash') then count('corrupt', 1) end
  redis.call('HSET', key, field, n)
  return n
end

-- Bookkeeping read from the agent's hashes is checked before a script writes anything
-- that depends on it: a value someone else wrote there would otherwise stop the script
-- half way (Redis does not roll a script back), leaving tasks in no state at all.

-- A score as stored (a string, passed on as is), absent = '0'; nil and a reason if it is
-- not a finite number.
local function score_in(raw, id)
  if not raw then return '0' end
  local value = tonumber(raw)
  if value and value == value and value ~= math.huge and value ~= -math.huge then return raw end
  return nil, 'corrupt bookkeeping: scores[' .. id .. '] = ' .. string.sub(raw, 1, 40) ..
    ' is not a number'
end

-- A count (deliveries, failures), absent = 0; nil and a reason if not a whole number.
local function count_in(hash, raw, id)
  if not raw then return 0 end
  if string.match(raw, '^%-?%d+$') and #raw < 16 then return tonumber(raw) end
  return nil, 'corrupt bookkeeping: ' .. hash .. '[' .. id .. '] = ' .. string.sub(raw, 1, 40) ..
    ' is not a whole number'
end

-- Groups (fair sharing and per-group limits; handoff/protocol/groups.py). A task enqueued
-- with a group waits in its group's own ready set, <base>:gq:<group>, not in the queue.
-- The rotation (K_GROUPS, group -> rank) holds the groups with ready tasks that may start,
-- ranked by their head's priority, then by when they were last served (a turn counter in
-- K_LIMITS): a claim takes one task from the first group, which goes to the back of its
-- priority. The ungrouped queue takes its turn in the same rotation. A group waiting for
-- its rate or a pause is parked (K_PARKED, group -> until ms); one at its concurrency cap
-- leaves the rotation until one of its leases ends. K_TASK_GROUPS (id -> group) and
-- K_GROUP_RUNNING (group -> leases held) are read only when the agent has grouped tasks
-- (the hot path: one EXISTS per call that needs to know).
local GROUPS_USED
local function groups_used()
  if GROUPS_USED == nil then GROUPS_USED = redis.call('EXISTS', K_TASK_GROUPS) == 1 end
  return GROUPS_USED
end

local function group_of(id)
  if not groups_used() then return nil end
  return redis.call('HGET', K_TASK_GROUPS, id)
end

-- Remember a task's group (enqueue, a join's then-task).
local function group_set(id, group)
  redis.call('HSET', K_TASK_GROUPS, id, group)
  GROUPS_USED = true
end

-- A task's group as its JSON says (task.py writes it last in the head, before "payload").
local GROUP_OF_JSON = '^{"id":"[^"]*","agent":"[^"]*"[^{]-"group":"([^"]*)","payload":'


-- The agent's own keys named at run time (a group's, a run's): same hash tag, same slot.
local AGENT_BASE = string.sub(K_QUEUE, 1, -7)  -- '<prefix>:{<agent>}' (K_QUEUE minus ':queue')
local function run_key(kind, id) return AGENT_BASE .. ':' .. kind .. ':' .. id end

-- Rank in the rotation: the head's priority first, then the turn it was last served.
local PRIO_UNIT = 2 ^ 40
local function rank_of(score, turn)
  return (math.floor(tonumber(score) / PRIORITY_SHIFT) + 1000) * PRIO_UNIT + turn
end

-- A group with ready tasks takes a place in the rotation, at the back of its head's
-- priority; one already there keeps its turn (its head's priority may have changed). A
-- parked group stays parked.
local function rotation_touch(group)
  if redis.call('ZSCORE', K_PARKED, group) then return end
  local head = redis.call('ZRANGE', run_key('gq', group), 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', K_GROUPS, group)
    return
  end
  local rank = redis.call('ZSCORE', K_GROUPS, group)
  local turn
  if rank then
    turn = tonumber(rank) % PRIO_UNIT
  else
    turn = incr(K_LIMITS, 'turn', 1)
  end
  redis.call('ZADD', K_GROUPS, rank_of(head[2], turn), group)
end

-- A task becomes ready: in its group's set (and the group in the rotation), or the queue.
local function ready_add(id, score, group)
  group = group or group_of(id)
  if group then
    if redis.call('ZADD', run_key('gq', group), score, id) == 1 then
      incr(K_LIMITS, 'grouped_ready', 1)  -- (queue_stats' count)
    end
    rotation_touch(group)
  else
    redis.call('ZADD', K_QUEUE, score, id)
  end
end

-- A ready task leaves (cancelled): 1 if it was ready.
local function ready_remove(id)
  local group = group_of(id)
  if group then
    local removed = redis.call('ZREM', run_key('gq', group), id)
    if removed == 1 then incr(K_LIMITS, 'grouped_ready', -1) end
    rotation_touch(group)
    return removed
  end
  return redis.call('ZREM', K_QUEUE, id)
end

-- Add delta to the leases group holds (K_GROUP_RUNNING). A count someone overwrote is
-- worked out again, every group's, from the leases (a lease that ended has left them;
-- one being taken has not yet: delta > 0 is added after). Leases this same call took or
-- ended for other groups may be missed: a count errs low (a few more may start until
-- those leases end; it never drops below zero), never high (which would strand a group).
local function group_count(group, delta)
  local reply = redis.pcall('HINCRBY', K_GROUP_RUNNING, group, delta)
  if type(reply) ~= 'table' then return reply end
  count('corrupt', 1)
  redis.call('DEL', K_GROUP_RUNNING)
  local held = {}
  for _, id in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do
    local g = redis.call('HGET', K_TASK_GROUPS, id)
    if g then held[g] = (held[g] or 0) + 1 end
  end
  for g, n in pairs(held) do redis.call('HSET', K_GROUP_RUNNING, g, n) end
  if delta > 0 then return redis.call('HINCRBY', K_GROUP_RUNNING, group, delta) end
  return held[group] or 0
end

-- A lease ended (finished, failed, released, reaped, cancelled, buried): its group holds
-- one less, and takes its place in the rotation again (it may have left it at its cap).
-- Whatever the cap is now: a cap changed live, or by a deploy, while the lease ran must
-- neither leave a count behind nor keep the group out of the rotation.
local function lease_ended(id)
  local group = group_of(id)
  if not group then return end
  if group_count(group, -1) <= 0 then
    redis.call('HDEL', K_GROUP_RUNNING, group)
  end
  rotation_touch(group)
end

-- Reports a dead-lettered task's end to its scope (defined with the runs helpers below).
local notice_dead

-- Dead-letter a task: kept with its payload and the reason, out of every other state.
local function bury(id, now, reason_json)
  notice_dead(id, now, reason_json)
  if redis.call('ZREM', K_LEASES, id) == 1 then lease_ended(id) end
  redis.call('HDEL', K_TOKENS, id)
  redis.call('ZADD', K_DEAD, now, id)
  redis.call('HSET', K_DEAD_REASONS, id, reason_json)
  count('dead', 1)
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
-- how many were queued again.
local function reap_expired(now, limit)
  if limit <= 0 then return 0 end
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, limit)
  local queued = 0
  for _, id in ipairs(expired) do
    redis.call('ZREM', K_LEASES, id)
    lease_ended(id)
    redis.call('HDEL', K_TOKENS, id)
    if requeue(id, now) then queued = queued + 1 end
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

-- Bulk helpers: one command for many members, in slices that fit Lua's unpack limit.
local BULK_SLICE = 4000

-- Append a pair to a flat list (field/value, score/member).
local function push2(list, a, b)
  local len = #list
  list[len + 1] = a
  list[len + 2] = b
end

-- cmd key a1 b1 a2 b2 ... for a flat list of pairs; nothing for an empty list.
local function bulk_write(cmd, key, flat)
  local len = #flat
  for first = 1, len, BULK_SLICE do
    redis.call(cmd, key, unpack(flat, first, math.min(first + BULK_SLICE - 1, len)))
  end
end

-- cmd key m1 m2 ... (HDEL, ZREM, RPUSH ...), in slices; returns the replies of list-replying
-- commands, concatenated.
local function bulk_call(cmd, key, members)
  local out, len = {}, #members
  for first = 1, len, BULK_SLICE do
    local reply = redis.call(cmd, key, unpack(members, first, math.min(first + BULK_SLICE - 1, len)))
    if type(reply) == 'table' then
      for _, value in ipairs(reply) do out[#out + 1] = value end
    end
  end
  return out
end

-- forget() for many finished tasks at once.
local function forget_all(ids)
  for _, key in ipairs({K_TASKS, K_TOKENS, K_DELIVERIES, K_FAILURES, K_SCORES}) do
    bulk_call('HDEL', key, ids)
  end
  if redis.call('EXISTS', K_DEADLINES) == 1 then bulk_call('HDEL', K_DEADLINES, ids) end
  if groups_used() then bulk_call('HDEL', K_TASK_GROUPS, ids) end
end

-- HGET of many fields, one call each: HMGET is not in every least-privilege ACL
-- (config/acl.conf), and inside a script the difference is small.
local function hget_each(key, fields)
  local out = {}
  for i, field in ipairs(fields) do out[i] = redis.call('HGET', key, field) end
  return out
end

-- Runs and joins (the picture: handoff/protocol/runs.py) -----------------------------------
-- A scope counts the open tasks of a run (in the root's slot) or of a join's branches (in
-- the then-task's slot): HASH <base>:scope:<id> with t:<task> = '1' open / '0' ended,
-- n (open count), reg (the opening notice arrived), cap and keep, c:<branch> (ends per
-- branch), done (when it ended), and for a join then (the then-task's JSON) and prio.
-- Its ends, in the order they arrived: STRING <base>:ends:<id>, each end's JSON followed by
-- a comma (APPEND: a then-task or a waiter reads all of them as one value, cheap to pass
-- through a script and to decode as one JSON array). Notices are idempotent: a
-- task closes once, a closed task is never reopened, so a notice that arrives twice, or
-- a child's end that arrives before its parent's step, changes nothing it should not.
local AGENT = string.match(AGENT_BASE, '{(.*)}$')
local SEP = '\31'
local NOTICE_SEP = '\30'
-- What a notice in an outbox looks like to be delivered: E, S or J, then a scope (a task id).
local NOTICE_OK = '^[ESJ]' .. SEP .. '[a-z0-9][a-z0-9_%-]*%.[A-Za-z0-9_%-]+' .. SEP

-- The first n SEP-separated fields of s, and the rest (which may hold anything) as n + 1.
local function split_fields(s, n)
  local out, from = {}, 1
  for i = 1, n do
    local at = string.find(s, SEP, from, true)
    if not at then
      out[i] = string.sub(s, from)
      return out
    end
    out[i] = string.sub(s, from, at - 1)
    from = at + 1
  end
  out[n + 1] = string.sub(s, from)
  return out
end

-- Wake whoever waits for this run's end (client.result(follow=True) blocks on this list),
-- and end its event stream when it has one (a task emitted, or a reader waits on it:
-- client.stream; a run that streams nothing pays one EXISTS).
local function run_ended_notice(run, keep)
  local ended = run_key('ended', run)
  redis.call('RPUSH', ended, '1')
  redis.call('PEXPIRE', ended, keep)
  local events = run_key('stream', run)
  if redis.call('EXISTS', events) == 1 then
    redis.call('XADD', events, '*', 'kind', 'end')
    redis.call('PEXPIRE', events, keep)
  end
end

local function scope_close(sk, tid)
  local state = redis.call('HGET', sk, 't:' .. tid)
  if state == '0' then return false end
  if state and state ~= '1' then error('corrupt scope') end  -- (see in_scope)
  redis.call('HSET', sk, 't:' .. tid, '0')
  if state == '1' then redis.call('HINCRBY', sk, 'n', -1) end
  return true
end

local function scope_open(sk, ids_csv)
  for id in string.gmatch(ids_csv, '[^,]+') do
    if redis.call('HSETNX', sk, 't:' .. id, '1') == 1 then redis.call('HINCRBY', sk, 'n', 1) end
  end
end

local function record_end(scope, sk, branch, status, end_json)
  if status ~= 'done' then redis.call('HSETNX', sk, 'dead', end_json) end  -- the first
  local cap = tonumber(redis.call('HGET', sk, 'cap') or '1000') or 1000
  if redis.call('HINCRBY', sk, 'c:' .. branch, 1) <= cap then
    redis.call('APPEND', run_key('ends', scope), end_json .. ',')
  else
    redis.call('HINCRBY', sk, 'dropped', 1)
  end
end

-- Cancellation (handoff/protocol/cancel.py). <base>:cancelled ZSET id -> until ms marks a
-- cancelled run (or a running task that was cancelled) in every agent's slot, for as
-- long as its records live: a task of a marked run, or whose parent is marked, ends
-- cancelled instead of being stored (enqueue), leased (claim) or fired (a join's
-- then-task). Looked at only when the set exists (the hot path: one EXISTS per call).
local RUN_OF = '^{"id":"[^"]*","agent":"[^"]*","run":"([^"]*)"'
local MARKS  -- nil until looked at
local function marked(id, now)
  if MARKS == nil then
    MARKS = redis.call('EXISTS', K_CANCELLED) == 1
    if MARKS then redis.call('ZREMRANGEBYSCORE', K_CANCELLED, '-inf', now) end
  end
  if not MARKS or not id or id == '' then return nil end
  local until_ms = tonumber(redis.call('ZSCORE', K_CANCELLED, id) or '0') or 0
  if until_ms > now then return until_ms end
  return nil
end

-- A task ends cancelled without running (or with its outcome to be dropped): its record
-- says so for ttl ms, its scope is told (defined below, with notice_ended). The caller
-- removes the task's state.
local end_cancelled

-- A join's branches have all ended: enqueue its then-task (its id is the scope's), once.
local function fire_then(id, sk, now)
  local json = redis.call('HGET', sk, 'then')
  if not json then return end
  redis.call('HDEL', sk, 'then')
  if redis.call('HEXISTS', K_TASKS, id) == 1 then return end
  local until_ms = redis.call('ZSCORE', K_FINISHED, id)
  if until_ms and tonumber(until_ms) > now then return end
  local until_ms = marked(string.match(json, RUN_OF), now)
  if until_ms then  -- its run was cancelled: it ends so, never queued
    end_cancelled(id, now, until_ms - now, json)
    return
  end
  local priority = tonumber(redis.call('HGET', sk, 'prio') or '0') or 0
  local score = string.format('%.0f', priority * PRIORITY_SHIFT + (now - EPOCH_MS))
  redis.call('HSET', K_TASKS, id, json)
  redis.call('HSET', K_SCORES, id, score)
  local group = string.match(json, GROUP_OF_JSON)
  if group then group_set(id, group) end
  ready_add(id, score, group)
  local expires = string.match(json,
    '^{"id":"[^"]*","agent":"[^"]*","run":"[^"]*","scope":"[^"]*","branch":%d+,"expires_at":(%d+)')
  if expires then redis.call('HSET', K_DEADLINES, id, expires) end  -- its run's deadline
  count('enqueued', 1)
  count('joins_fired', 1)
  wake(1)
end

-- What is wrong with a scope someone overwrote (the key or the field named), or nil: its
-- keys' types, its counts, and n against the tasks it holds open (n is kept equal to them).
local function scope_fault(scope)
  local sk, name = run_key('scope', scope), 'scope:' .. scope
  local kind = redis.call('TYPE', sk).ok
  if kind ~= 'hash' and kind ~= 'none' then return name .. ' is a ' .. kind .. ', not a hash' end
  kind = redis.call('TYPE', run_key('ends', scope)).ok
  if kind ~= 'string' and kind ~= 'none' then
    return 'ends:' .. scope .. ' is a ' .. kind .. ', not a string'
  end
  local flat, n, open = redis.call('HGETALL', sk), 0, 0
  for i = 1, #flat, 2 do
    local field, value = flat[i], flat[i + 1]
    local head = string.sub(field, 1, 2)
    if field == 'n' or field == 'dropped' or head == 'c:' then
      if not string.match(value, '^%d+$') or #value > 15 then
        return name .. ' ' .. field .. ' = ' .. string.sub(value, 1, 40) .. ' is not a count'
      end
      if field == 'n' then n = tonumber(value) end
    elseif head == 't:' and value ~= '0' then
      if value ~= '1' then
        return name .. ' ' .. field .. ' = ' .. string.sub(value, 1, 40) .. ' is not 0 or 1'
      end
      open = open + 1
    end
  end
  if n ~= open then return name .. ' n = ' .. n .. ' but ' .. open .. ' of its tasks are open' end
  return nil
end

-- Once the opening notice has arrived and nothing is open, the scope has ended: a run
-- wakes its waiters and is kept `keep` ms; a join enqueues its then-task. A count someone
-- overwrote must not end it early: it is checked first (once per scope: see scope_corrupt).
local function scope_settle(scope, sk, run, now)
  if redis.call('HGET', sk, 'reg') ~= '1' or redis.call('HEXISTS', sk, 'done') == 1 then return end
  if (tonumber(redis.call('HGET', sk, 'n') or '0') or 0) > 0 then return end
  if scope_fault(scope) then error('corrupt scope') end
  redis.call('HSET', sk, 'done', now)
  if scope == run then
    local keep = tonumber(redis.call('HGET', sk, 'keep') or '3600000') or 3600000
    redis.call('PEXPIRE', sk, keep)
    redis.call('PEXPIRE', run_key('ends', scope), keep)
    run_ended_notice(run, keep)
    count('runs_ended', 1)
  else
    fire_then(scope, sk, now)
  end
end

-- Tasks whose end needs more than their record (ZSET <base>:watched:runs, id -> until
-- ms): a client waits for its result or its run (client.result, until its flag's TTL), or
-- an end of a task of its run arrived before the root's own step (+inf: an earlier
-- delivery of the root handed off, then its ack was lost). An ack looks at this set once
-- per call, and per task only when it exists: the hot path is no command at all.
local WATCHED = run_key('watched', 'runs')

-- Wake whoever waits for this task's own result (client.result: BLMOVE on this list).
local function result_ready(id)
  local done = run_key('done', id)
  redis.call('RPUSH', done, '1')
  redis.call('PEXPIRE', done, 60000)
end

-- A root ended without handing off (done, or dead): its run is itself, and its result
-- record or its dead letter says it all, unless it is watched (see WATCHED).
-- end_json: the end as stored, or nil to make it from result_json (a done root).
local function root_ended(root, now, status, end_json, result_json)
  redis.call('ZREM', WATCHED, root)
  local sk = run_key('scope', root)
  if redis.call('EXISTS', sk) == 0 then
    run_ended_notice(root, 60000)  -- a waiter: the run of one task has ended
    return
  end
  if not end_json then
    end_json = '{"id":"' .. root .. '","agent":"' .. AGENT .. '","branch":0,"status":"done",' ..
      '"result":' .. (result_json ~= '' and result_json or 'null') .. '}'
  end
  if scope_close(sk, root) then record_end(root, sk, '0', status, end_json) end
  redis.call('HSET', sk, 'reg', '1')
  scope_settle(root, sk, root, now)
end

-- A scope someone overwrote (why: scope_fault's finding) counts nothing more: it ends here,
-- kept as a marker that later notices leave alone. A join's then-task, not yet fired, is
-- dead-lettered saying why (its end goes to its run, which goes on; a requeue runs it with
-- no ends); a run ends with one dead end saying why (its waiters wake). Counted: corrupt.
local function scope_corrupt(scope, run, now, why)
  local sk = run_key('scope', scope)
  local ek = run_key('ends', scope)
  local json, keep = nil, 3600000
  if redis.call('TYPE', sk).ok == 'hash' then
    json = redis.call('HGET', sk, 'then')
    keep = tonumber(redis.call('HGET', sk, 'keep') or '') or keep
  end
  why = 'corrupt bookkeeping: ' .. why
  redis.call('DEL', sk, ek)
  redis.call('HSET', sk, 'reg', '1', 'done', now, 'corrupt', why)
  redis.call('PEXPIRE', sk, keep)
  count('corrupt', 1)
  if scope == run then
    local end_json = cjson.encode({id = run, agent = AGENT, branch = 0, status = 'dead',
      reason = why})
    redis.call('SET', ek, end_json .. ',', 'PX', keep)
    run_ended_notice(run, keep)
  elseif redis.call('HEXISTS', K_TASKS, scope) == 0 and not redis.call('ZSCORE', K_DEAD, scope)
    and redis.call('EXISTS', run_key('result', scope)) == 0 then
    -- (its JSON went with a scope overwritten whole: a stub, in task.py's order, reports
    -- to the run)
    redis.call('HSET', K_TASKS, scope, json or '{"id":"' .. scope .. '","agent":"' .. AGENT ..
      '","run":"' .. run .. '","scope":"' .. run .. '","branch":0,"payload":null}')
    bury(scope, now, cjson.encode({reason = why, at = now}))
  end
end

-- fn(...) changes scope: should it fail on what someone wrote there, the scope ends as
-- corrupt (any other error is raised as it was).
local function in_scope(scope, run, now, fn, ...)
  local ok, err = pcall(fn, ...)
  if ok then return end
  local why = scope_fault(scope)
  if not why then error(err) end
  scope_corrupt(scope, run, now, why)
end

-- Apply one notice to a scope that lives in this slot. Notices (built by
-- handoff/protocol/runs.py, or by notice_dead below), fields separated by SEP:
--   E scope run task branch status end_json   a task ended (status done or dead)
--   (a root that ends without handing off sends 'R' alone in its ack: root_ended)
--   S scope run task cap keep children_csv    a task handed off: children replace it
--   J join run task cap keep branches_csv priority then_json     a join starts
--   D join                                    the then-task finished: drop the join
local function apply_to_scope(op, f, now)
  local scope, run, tid = f[2], f[3], f[4]
  local sk = run_key('scope', scope)
  if op == 'E' and tid == run then
    if redis.call('ZSCORE', WATCHED, tid) or redis.call('EXISTS', sk) == 1 then
      root_ended(tid, now, f[6], f[7], nil)
    end
    return
  end
  if scope == run and tid ~= run and op ~= 'J' and redis.call('HGET', sk, 'reg') ~= '1' then
    local record = redis.call('GET', run_key('result', run))
    if record and string.sub(record, 1, 21) == '{"status":"cancelled"' then
      -- the root was cancelled while it ran: its step never comes, this end counts now
      redis.call('HSET', sk, 'reg', '1')
    else
      -- before the root's own step: should the root end without it, its ack must know
      redis.call('ZADD', WATCHED, '+inf', run)
    end
  end
  if op == 'E' then
    if scope_close(sk, tid) then record_end(scope, sk, f[5], f[6], f[7]) end
  elseif op == 'S' then
    if scope_close(sk, tid) then scope_open(sk, f[7]) end
    if tid == run then
      redis.call('HSET', sk, 'reg', '1', 'cap', f[5], 'keep', f[6])
      redis.call('ZREM', WATCHED, run)
    end
  elseif op == 'J' then
    if redis.call('HSETNX', sk, 'reg', '1') == 1 then
      redis.call('HSET', sk, 'cap', f[5], 'keep', f[6], 'then', f[9], 'prio', f[8])
      scope_open(sk, f[7])
    end
  else
    return
  end
  scope_settle(scope, sk, run, now)
end

local function apply_notice(notice, now)
  local op = string.sub(notice, 1, 1)
  if op == 'D' then
    local join = string.sub(notice, 3)
    redis.call('DEL', run_key('scope', join), run_key('ends', join))
    return
  end
  local f
  if op == 'J' then f = split_fields(notice, 8) else f = split_fields(notice, 6) end
  in_scope(f[2], f[3], now, apply_to_scope, op, f, now)
end

-- Send a notice to its scope: applied here when the scope lives in this slot, else kept
-- in this agent's outbox (written in the same script as the state change it reports)
-- until a worker or the reaper has delivered it: <base>:outbox HASH field -> at SEP notice.
local SCOPE_OF = '^.' .. SEP .. '([^.' .. SEP .. ']*)'  -- a notice's scope's agent
local OUTBOXED = {}  -- field, notice, ...: what this call wrote to the outbox (to return)

-- A reply ends with '|' and what went to the outbox, when anything did (the caller
-- delivers it at once).
local function with_outboxed(reply)
  if #OUTBOXED > 0 then
    reply[#reply + 1] = '|'
    for _, item in ipairs(OUTBOXED) do reply[#reply + 1] = item end
  end
  return reply
end
local function emit_notice(notice, field, now)
  if string.match(notice, SCOPE_OF) == AGENT then
    apply_notice(notice, now)
  else
    if type(redis.pcall('HSET', K_OUTBOX, field, now .. SEP .. notice)) == 'table' then
      standing(K_OUTBOX, 'hash')  -- overwritten: what it held was no notice
      redis.call('HSET', K_OUTBOX, field, now .. SEP .. notice)
    end
    OUTBOXED[#OUTBOXED + 1] = field
    OUTBOXED[#OUTBOXED + 1] = notice
  end
end

-- A task ended without running to a result (dead, expired, cancelled): its end goes
-- to its scope. Its place in its run is read from the head of its JSON (task.py writes
-- run, scope, branch right after id and agent), so call this before forgetting it.
-- json: the task's JSON when it is not (or no longer) in the tasks hash.
local function notice_ended(id, now, status, reason, json)
  if redis.call('ZSCORE', WATCHED, id) then result_ready(id) end
  json = json or redis.call('HGET', K_TASKS, id)
  local run, scope, branch
  if json then
    run, scope, branch = string.match(json,
      '^{"id":"[^"]*","agent":"[^"]*","run":"([^"]*)","scope":"([^"]*)","branch":(%d+)')
  end
  if not run then
    run, scope, branch = id, id, '0'
  else  -- a then-task's join state lives as long as its run's records (done: 'D' drops it)
    local sk = run_key('scope', id)
    local keep = redis.pcall('HGET', sk, 'keep')  -- (an overwritten scope expires all the same)
    if keep then
      keep = tonumber(keep) or 3600000
      redis.call('PEXPIRE', sk, keep)
      redis.call('PEXPIRE', run_key('ends', id), keep)
    end
  end
  local end_json = cjson.encode({id = id, agent = AGENT, branch = tonumber(branch),
    status = status, reason = reason})
  emit_notice('E' .. SEP .. scope .. SEP .. run .. SEP .. id .. SEP .. branch .. SEP .. status ..
    SEP .. end_json, id .. ':' .. status, now)
end

notice_dead = function(id, now, reason_json)
  local ok, decoded = pcall(cjson.decode, reason_json)
  local reason = ok and type(decoded) == 'table' and decoded.reason or 'dead-lettered'
  if type(reason) ~= 'string' then reason = 'dead-lettered' end
  notice_ended(id, now, 'dead', reason)
end

-- A task not started by its deadline: it ends 'expired' and is forgotten, its record
-- says so for record_ttl ms (result() raises TaskExpired), its run or join is told.
local function expire(id, now, deadline, record_ttl)
  if record_ttl > 0 then
    redis.call('SET', run_key('result', id), '{"status":"expired","finished_at":' .. now ..
      ',"expired_at":' .. deadline .. '}', 'PX', record_ttl)
  end
  notice_ended(id, now, 'expired', 'not started by its deadline')
  forget(id)
  redis.call('HDEL', K_DEADLINES, id)
  count('expired', 1)
end

end_cancelled = function(id, now, ttl, json)
  ttl = math.max(60000, math.floor(ttl))
  redis.call('SET', run_key('result', id), '{"status":"cancelled","finished_at":' .. now .. '}',
    'PX', ttl)
  notice_ended(id, now, 'cancelled', 'cancelled', json)
  -- An id from a key or a parent is refused again while its record lives (a parent that
  -- runs again hands off the same ids: what was cancelled stays so). A payload holding
  -- the text only adds a refusal nobody asks for.
  if string.find(json, '"parent_id":', 1, true) or string.find(json, '"key":', 1, true) then
    redis.call('ZADD', K_FINISHED, now + ttl, id)
  end
  count('cancelled', 1)
end

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
  redis.call('HSET', K_TASKS, id, string.sub(json, 1, -2) .. ',"woke":' .. woke .. '}')
  local score = redis.call('HGET', K_SCORES, id) or '0'
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
