-- notices: how an end reaches its run or join: notices, the outbox, ends of every kind
-- Included by the scripts that list it on their `-- include:` line (scripts.py puts the
-- included files, in the order of lib/ORDER, after the key header and before the body).

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
  ended_for_good(id)
end

end_cancelled = function(id, now, ttl, json)
  ttl = math.max(60000, math.floor(ttl))
  -- The record keeps the task's JSON (when it is JSON): a rerun (rerun.py) sends it again.
  local kept = ''
  if string.sub(json, 1, 7) == '{"id":"' and pcall(cjson.decode, json) then
    kept = ',"task":' .. json
  end
  redis.call('SET', run_key('result', id), '{"status":"cancelled","finished_at":' .. now ..
    kept .. '}', 'PX', ttl)
  notice_ended(id, now, 'cancelled', 'cancelled', json)
  -- An id from a key or a parent is refused again while its record lives (a parent that
  -- runs again hands off the same ids: what was cancelled stays so). A payload holding
  -- the text only adds a refusal nobody asks for.
  if string.find(json, '"parent_id":', 1, true) or string.find(json, '"key":', 1, true) then
    redis.call('ZADD', K_FINISHED, now + ttl, id)
  end
  count('cancelled', 1)
  ended_for_good(id)
end
