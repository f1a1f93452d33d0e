-- leasing: what a claim does with the tasks it popped: end those past their deadline or
-- cancelled, dead-letter poison and corrupt ones, put back a suspect not for this caller,
-- lease the rest; and a retried claim's replay.
-- Included by the scripts that list it on their `-- include:` line (scripts.py puts the
-- included files, in the order of lib/ORDER, after the key header and before the body).

-- These work on claim.lua's state table, `claim`: now, out (its reply), token, lease_ms,
-- max_deliveries, isolate, solo.

-- The first dead end of a then-task's join ('' for other tasks, and when none). Only a
-- task whose JSON has a join looks (a payload that happens to hold the text reads '').
-- nil and why when someone overwrote the join's scope with another type.
local function join_state(id, json)
  if not json then return '' end
  -- A root (no "run" right after id and agent, where task.py writes it) is never one.
  local at = #id + #AGENT + 20
  if string.sub(json, at, at + 6) ~= ',"run":' then return '' end
  if not string.find(json, '"join":{"on_dead":', at, true) then return '' end
  local dead = redis.pcall('HGET', run_key('scope', id), 'dead')
  if type(dead) == 'table' then return nil, scope_fault(id) or 'scope:' .. id end
  return dead or ''
end

-- A leased task on the reply: id, json, attempt, deliveries, its join's first dead end.
local function emit(out, id, json, failures, deliveries, join)
  local len = #out
  out[len + 1] = id
  out[len + 2] = json
  out[len + 3] = failures + 1
  out[len + 4] = deliveries
  out[len + 5] = join or join_state(id, json) or ''
end

-- A retried claim (key: its replay key): return what the first call leased and still
-- holds; lease nothing new.
local function claim_replay(claim, key)
  local ids = redis.call('LRANGE', key, 0, -1)
  local holders = hget_each(K_TOKENS, ids)
  local payloads = hget_each(K_TASKS, ids)
  local failures = hget_each(K_FAILURES, ids)
  local deliveries = hget_each(K_DELIVERIES, ids)
  for i, id in ipairs(ids) do
    if holders[i] == claim.token then  -- counts as leased: a corrupt one reads as 0 here
      emit(claim.out, id, payloads[i], count_in('failures', failures[i], id) or 0,
        count_in('deliveries', deliveries[i], id) or 0)
    end
  end
  return claim.out
end

-- The popped tasks that end here, never leased: past their deadline (K_DEADLINES: ended
-- expired, the record kept record_ttl ms) or cancelled (their run, or themselves).
-- Returns their positions in ids (position -> true).
local function end_unleasable(now, ids, payloads, record_ttl)
  local ended = {}
  if redis.call('EXISTS', K_DEADLINES) == 1 then  -- some task has a deadline: look per task
    local due_by = hget_each(K_DEADLINES, ids)
    for i, id in ipairs(ids) do
      if payloads[i] and due_by[i] and (tonumber(due_by[i]) or 0) <= now then
        expire(id, now, due_by[i], record_ttl)
        ended[i] = true
      end
    end
  end
  for i, id in ipairs(ids) do  -- cancelled (its run, or itself): ends so, never leased
    local json = payloads[i]
    if json and not ended[i] then
      local until_ms = marked(id, now) or marked(string.match(json, RUN_OF), now)
      if until_ms then
        end_cancelled(id, now, until_ms - now, json)
        forget(id)
        ended[i] = true
      end
    end
    if MARKS == false then break end  -- nothing is cancelled: look no further
  end
  return ended
end

-- Each popped task in turn (t: ids, popped (id, score, ...), payloads, failures, delivered,
-- ended (see end_unleasable), groups_of): leased to claim.token, and on claim.out, unless
-- it ended above, its counts are corrupt, it is a suspect not for this caller (put back),
-- it has no payload (an orphan, counted), it is poison (delivered more than max_deliveries
-- times without finishing) or its join's state is corrupt. Returns what to write: counts
-- (id, deliveries, ...), leases (deadline, id, ...), tokens (id, token, ...), the ids leased.
local function lease_each(claim, t)
  local out, now, token, isolate = claim.out, claim.now, claim.token, claim.isolate
  local deadline = now + claim.lease_ms
  local counts, leases, tokens, leased = {}, {}, {}, {}
  local c = 0  -- pairs written so far (counts, leases and tokens grow in step)
  local took_suspect = false
  for i, id in ipairs(t.ids) do
    local json = t.payloads[i]
    local before, bad_deliveries = count_in('deliveries', t.delivered[i], id)
    local failed, bad_failures = count_in('failures', t.failures[i], id)
    local suspect = isolate and json and before and failed and before - failed >= 1
    if t.ended[i] then
      -- ended expired or cancelled: not leased
    elseif json and (bad_deliveries or bad_failures) then
      if bad_deliveries then
        bury_corrupt(id, now, K_DELIVERIES, bad_deliveries)
      else
        bury_corrupt(id, now, K_FAILURES, bad_failures)
      end
    elseif json and (took_suspect or (suspect and (not claim.solo or c > 0))) then
      -- Not for this caller: back to its place in the queue (or its group's).
      ready_add(id, t.popped[2 * i])
      if suspect then out[4] = 1 end
    elseif not json then
      -- A queue entry with no payload: nothing to run, nothing to lose. Count it and move on.
      count('orphans', 1)
      redis.call('HDEL', K_SCORES, id)
    else
      local deliveries = before + 1
      counts[#counts + 1] = id
      counts[#counts + 1] = deliveries
      local join, bad_join = join_state(id, json)
      if deliveries - failed > claim.max_deliveries then
        bury(id, now, '{"reason":"poison: delivered ' .. (deliveries - 1 - failed) ..
          ' times without finishing (worker crashed or lease expired each time)","at":' .. now .. '}')
      elseif bad_join then  -- its join's state was overwritten: it cannot know its branches
        bury(id, now, cjson.encode({reason = 'corrupt bookkeeping: ' .. bad_join, at = now}))
        count('corrupt', 1)
      else
        if suspect then took_suspect = true end
        c = c + 2
        leases[c - 1], leases[c] = deadline, id
        tokens[c - 1], tokens[c] = id, token
        leased[c / 2] = id
        emit(out, id, json, failed, deliveries, join)
        local group = t.groups_of and t.groups_of[id]
        if group then group_count(group, 1) end  -- cap or not
      end
    end
  end
  return counts, leases, tokens, leased
end
