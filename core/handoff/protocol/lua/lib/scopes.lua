-- scopes: runs and joins: scopes, ends, a join firing its then-task, corrupt scopes
-- Included by the scripts that list it on their `-- include:` line (scripts.py puts the
-- included files, in the order of lib/ORDER, after the key header and before the body).

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
