-- claim: lease up to n ready tasks of one agent type, atomically, in one call.
-- include: base, groups, tasks, bulk, scopes, notices
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- KEYS[FIXED_KEYS + 1]  this claim's replay key (LIST of the ids it leased)
-- ARGV[1] n (capped at ARGV[7])   ARGV[2] lease_ms      ARGV[3] claim_id (the lease token)
-- ARGV[4] max_deliveries          ARGV[5] global_limit (0 = none)
-- ARGV[6] now in ms ('' = server TIME)                    ARGV[7] cap on n
-- ARGV[8] promote/reap bound per call
-- ARGV[9] '1' = isolate suspects      ARGV[10] '1' = the caller holds no other task (solo)
-- ARGV[11] the agent's declared start rate: starts per window ('' or 0 = none), ARGV[12]
--   the window ms, ARGV[13] burst; a rate set live in K_LIMITS ('count/window_ms', or
--   'none') overrides them. Starts are admitted by GCRA (see handoff/protocol/limits.py),
--   spaced GUARD (ARGV[14]) wider than the rate; an agent paused (a handler raised
--   RateLimited: K_LIMITS paused_until) admits nothing until then. When the rate or the
--   pause holds tasks back, next_due says when to claim again.
-- ARGV[16..18] the groups' limits (see pick_fairly below).
-- ARGV[15] record TTL ms: a task popped after its deadline (K_DEADLINES) is not leased but
--   ends expired, its record kept this long (see expire in lib/notices.lua). A task of a
--   cancelled run (K_CANCELLED) is not leased either: it ends cancelled.
--   A suspect was delivered before and neither finished nor failed: its worker died or
--   stalled. It may be a poison task that kills its process, so it is leased only to a
--   solo caller and alone; a non-solo caller leaves it queued and is told it waits (so it
--   can drain and come back solo). Innocent tasks never share a process with it twice.
-- Steps: replay a claim whose reply was lost (same claim_id -> same batch, no second lease);
-- promote due delayed tasks; reap expired leases; pop up to n by score; dead-letter any task
-- delivered more than max_deliveries times without finishing; lease the rest with the token
-- and a deadline from server time; count the delivery. Writes go in bulk commands per batch
-- (HSET, ZADD of many members); reads are one HGET each (see hget_each in lib/bulk.lua).
-- A join's then-task comes with its join's first dead end ('' if none: its on_dead policy
-- is applied at claim); its branches' ends are read when its handler first asks for them.
-- A task it dead-letters (poison, corrupt) or expires sends its end to its run or join;
-- what went to the outbox is returned for the caller to deliver at once.
-- Returns: {now, next_due (ms of the earliest delayed task, -1 if none), inbox_seq (the
--           sequence number of the last cancel pushed to the claiming worker's inbox, 0 if
--           none: see cancel.lua), [suspects_waiting (0/1), only when isolating,] id1, json1, attempt1,
--           deliveries1, join1, id2, ..., ['|', outbox field, notice, ...]}
-- The plain case runs first, ahead of the prelude (whose function definitions would be
-- most of its server time, and an idle worker's pickup waits on it): not a replay, no
-- limit, group, deadline or cancel anywhere in the agent, nothing due to promote, reap or
-- forget, and every task popped a clean one that has no join (no suspect, poison or bad
-- count). Anything else puts back what it popped and falls through to the full claim
-- below, which then finds the state as it was.
do
  local n = math.min(tonumber(ARGV[1]), tonumber(ARGV[7]))
  local function none(i) return (tonumber(ARGV[i]) or 0) <= 0 end
  if n <= 4000 and none(5) and none(11) and none(16) and none(18) and none(19)
    and redis.call('EXISTS', K_LIMITS, K_GROUPS, K_PARKED, K_DEADLINES, K_CANCELLED,
      KEYS[FIXED_KEYS + 1]) == 0 then
    local now = tonumber(ARGV[6])
    if ARGV[6] == '' then
      local t = redis.call('TIME')
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    local bound = tonumber(ARGV[8])
    local tag = string.match(ARGV[3], '^(%w+)%-')
    local seq = tag and redis.call('GET', run_key('inbox_seq', tag))
    local out = {now, -1, seq or 0}
    local head = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
    if #head > 0 then out[2] = tonumber(head[2]) end
    local function idle(key)  -- no work for promote_due, reap_expired, expire_finished
      if bound <= 0 then return true end
      local first = key == K_DELAYED and head or redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      return #first == 0 or tonumber(first[2]) > now
    end
    if idle(K_DELAYED) and idle(K_LEASES) and idle(K_FINISHED) then
      local isolate, max_deliveries = ARGV[9] == '1', tonumber(ARGV[4])
      if isolate then out[4] = 0 end
      local popped = n > 0 and redis.call('ZPOPMIN', K_QUEUE, n) or {}
      local at = #string.match(K_QUEUE, '{(.*)}:queue$') + 20  -- as join_state looks
      local counts, leases, tokens, ids = {}, {}, {}, {}
      local deadline, token = now + tonumber(ARGV[2]), ARGV[3]
      local plain = true
      for i = 1, #popped, 2 do
        local id = popped[i]
        local json = redis.call('HGET', K_TASKS, id)
        local failed = redis.call('HGET', K_FAILURES, id) or '0'
        local before = redis.call('HGET', K_DELIVERIES, id) or '0'
        plain = json and string.match(failed, '^%d+$') and #failed < 16
          and string.match(before, '^%d+$') and #before < 16
        if plain then
          failed, before = tonumber(failed), tonumber(before)
          plain = not (isolate and before - failed >= 1) and before + 1 - failed <= max_deliveries
            and not (string.sub(json, #id + at, #id + at + 6) == ',"run":'
              and string.find(json, '"join":{"on_dead":', #id + at, true))
        end
        if not plain then break end
        local k = #ids + 1
        ids[k] = id
        counts[2 * k - 1], counts[2 * k] = id, before + 1
        leases[2 * k - 1], leases[2 * k] = deadline, id
        tokens[2 * k - 1], tokens[2 * k] = id, token
        local o = #out
        out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] =
          id, json, failed + 1, before + 1, ''
      end
      if plain then
        if #ids > 0 then
          redis.call('HSET', K_DELIVERIES, unpack(counts))
          redis.call('ZADD', K_LEASES, unpack(leases))
          redis.call('HSET', K_TOKENS, unpack(tokens))
          redis.call('RPUSH', KEYS[FIXED_KEYS + 1], unpack(ids))
          redis.call('PEXPIRE', KEYS[FIXED_KEYS + 1], tonumber(ARGV[2]))
        end
        return out
      end
      local back = {}
      for i = 1, #popped, 2 do back[i], back[i + 1] = popped[i + 1], popped[i] end
      redis.call('ZADD', K_QUEUE, unpack(back))
    end
  end
end
--@prelude
local claim_key = KEYS[FIXED_KEYS + 1]
local n = math.min(tonumber(ARGV[1]), tonumber(ARGV[7]))
local lease_ms = tonumber(ARGV[2])
local token = ARGV[3]
local max_deliveries = tonumber(ARGV[4])
local global_limit = tonumber(ARGV[5])
local now = now_ms(ARGV[6])
local bound = tonumber(ARGV[8])
local isolate = ARGV[9] == '1'
local solo = ARGV[10] == '1'
local inbox_tag = string.match(token, '^(%w+)%-')
local out = {now, -1, inbox_tag and redis.call('GET', run_key('inbox_seq', inbox_tag)) or 0}
if isolate then out[4] = 0 end

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

local function emit(id, json, failures, deliveries, join)
  local len = #out
  out[len + 1] = id
  out[len + 2] = json
  out[len + 3] = failures + 1
  out[len + 4] = deliveries
  out[len + 5] = join or join_state(id, json) or ''
end

-- A retried claim: return what the first call leased and still holds; lease nothing new.
if redis.call('EXISTS', claim_key) == 1 then
  local ids = redis.call('LRANGE', claim_key, 0, -1)
  local holders = hget_each(K_TOKENS, ids)
  local payloads = hget_each(K_TASKS, ids)
  local failures = hget_each(K_FAILURES, ids)
  local deliveries = hget_each(K_DELIVERIES, ids)
  for i, id in ipairs(ids) do
    if holders[i] == token then  -- counts as leased: a corrupt one reads as 0 here
      emit(id, payloads[i], count_in('failures', failures[i], id) or 0,
        count_in('deliveries', deliveries[i], id) or 0)
    end
  end
  return out
end

wake(promote_due(now, bound) + reap_expired(now, bound))
expire_finished(now, bound)
local head = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
if #head > 0 then out[2] = tonumber(head[2]) end

if global_limit > 0 then
  n = math.min(n, global_limit - redis.call('ZCARD', K_LEASES))
end
if n <= 0 then return out end

-- The start-rate limit, and a pause.
local function has_ready()
  return redis.call('ZCARD', K_QUEUE) > 0 or redis.call('EXISTS', K_GROUPS) == 1
end
local function due_at(ms)
  if out[2] < 0 or ms < out[2] then out[2] = math.ceil(ms) end
end
-- The agent's limiter state, read once: rate, burst, tat, paused_until, cost_*, turns.
local LIMITS = {}
do
  standing(K_LIMITS, 'hash')
  local flat = redis.call('HGETALL', K_LIMITS)
  for i = 1, #flat, 2 do LIMITS[flat[i]] = flat[i + 1] end
end
local paused = tonumber(LIMITS.paused_until or '0') or 0
if paused > now then
  if has_ready() then due_at(paused) end
  return out
end
local rate_count, rate_window = tonumber(ARGV[11]) or 0, tonumber(ARGV[12]) or 0
local burst = tonumber(ARGV[13]) or 0

-- A limit set live ('count/window_ms', or 'none' = lifted) overrides the code's.
local function live_limit(live, count, window)
  if live == 'none' then return 0, window end
  local c, w = string.match(live or '', '^([%d.]+)/(%d+)$')
  if c then return tonumber(c), tonumber(w) end
  return count, window
end
rate_count, rate_window = live_limit(LIMITS.rate, rate_count, rate_window)
if LIMITS.rate then burst = tonumber(LIMITS.burst or '') or burst end
local interval, tat = 0, 0
if rate_count > 0 and rate_window > 0 then
  local guard = tonumber(ARGV[14]) or 0
  interval = rate_window / rate_count * (1 + guard)
  -- A claim late by less than `slack` keeps the schedule (the rate is held whatever the
  -- claimers' punctuality); later than that, the schedule starts again from now.
  local slack = math.min(interval / 2, rate_window * guard / 4)
  tat = tonumber(LIMITS.tat or '0') or 0
  -- Later than that, it starts again from now (a rate faster than a start per ms: from
  -- the start of this ms, whose starts one claim then admits; no other credit is kept).
  if now - tat >= slack then tat = math.max(tat, now - math.max(0, 1 - interval)) end
  local allowed = math.floor((now + burst * interval - tat) / interval) + 1
  if allowed <= 0 then
    if has_ready() then due_at(tat - burst * interval) end
    return out
  end
  n = math.min(n, allowed)
end

-- Cost units (cost_limit, task.charge): ARGV[19] units per ARGV[20] window ms; K_LIMITS
-- cost_limit ('count/window_ms' or 'none') set live overrides them. A GCRA clock in units
-- (cost_tat): each start reserves the average charge so far (a whole window's worth
-- before the first charge is known, so one task runs alone until its charge lands), and
-- the ack replaces the reservation with what was charged. A spent window stops claims
-- until it refills; the starts a window holds follow what the tasks really charge.
local cost_count, cost_window = live_limit(LIMITS.cost_limit, tonumber(ARGV[19]) or 0,
  tonumber(ARGV[20]) or 0)
local cost_unit, cost_reserve, cost_tat = 0, 0, 0
if cost_count > 0 and cost_window > 0 then
  cost_unit = cost_window / cost_count * (1 + (tonumber(ARGV[14]) or 0))
  cost_reserve = tonumber(LIMITS.cost_avg or '') or cost_count
  cost_tat = tonumber(LIMITS.cost_tat or '0') or 0
  if cost_tat < now then cost_tat = now end  -- no credit saved up: no burst
  if cost_reserve > 0 then
    if cost_tat > now then
      if has_ready() then due_at(cost_tat) end
      return out
    end
    n = math.min(n, 1)  -- spaced: the next start waits for this one's reservation
  end
end

-- Groups' limits: ARGV[16] group_rate count per ARGV[17] window ms, ARGV[18] the most
-- running per group (0 = none); K_LIMITS group_rate ('count/window_ms' or 'none') and
-- group_concurrency, set live, override them.
local g_count, g_window = tonumber(ARGV[16]) or 0, tonumber(ARGV[17]) or 0
local g_cap = tonumber(ARGV[18]) or 0
local function group_limits()
  g_count, g_window = live_limit(LIMITS.group_rate, g_count, g_window)
  g_cap = tonumber(LIMITS.group_concurrency or '') or g_cap
end

-- Whether group g may start one more now: nil = yes (its rate's clock moves on); a time
-- (ms) = not before then (park it); false = at its concurrency cap (until a lease ends).
-- (A group paused by RateLimited is parked by release.lua until its pause ends, so one in
-- the rotation is not paused: only its cap and its rate are looked at here.)
local function group_blocked(g, taken, interval, slack)
  local gl = run_key('glimit', g)
  if g_cap > 0 then
    local running = redis.pcall('HGET', K_GROUP_RUNNING, g)
    if type(running) == 'table' then running = group_count(g, 0) end  -- overwritten
    running = tonumber(running or '0') or 0
    if running + (taken[g] or 0) >= g_cap then return false end
  end
  if interval > 0 then
    local tat = redis.pcall('HGET', gl, 'tat')
    if type(tat) == 'table' then standing(gl, 'hash') end  -- overwritten: its clock restarts
    tat = tonumber(type(tat) == 'string' and tat or '0') or 0
    local idle = now - tat >= slack
    if idle then tat = now end
    -- a rate faster than a start per ms admits all its starts of this ms (the clock's)
    local tolerance = math.max(0, 1 - interval)
    if tat > now + tolerance then return math.ceil(tat - tolerance) end
    redis.call('HSET', gl, 'tat', string.format('%.3f', tat + interval))
    -- An idle group's limiter goes after a while (set when it starts again: once it
    -- expires its clock is at most one interval ahead, which a reset gives back).
    if idle then redis.call('PEXPIRE', gl, math.max(60000, math.ceil(2 * interval))) end
  end
  return nil
end

-- Up to n ready tasks taken fairly, in rounds: the first groups of the rotation each give
-- one task, in rank order (the ungrouped queue takes its turn among them by its own
-- rank), then each goes to the back of its priority. Returns {id, score, ...} as ZPOPMIN
-- would, and each grouped task's group.
local function pick_fairly(n)
  group_limits()
  local interval, slack = 0, 0
  if g_count > 0 and g_window > 0 then
    local guard = tonumber(ARGV[14]) or 0
    interval = g_window / g_count * (1 + guard)
    slack = math.min(interval / 2, g_window * guard / 4)
  end
  for _, g in ipairs(redis.call('ZRANGEBYSCORE', K_PARKED, '-inf', now, 'LIMIT', 0, bound)) do
    redis.call('ZREM', K_PARKED, g)
    rotation_touch(g)
  end
  local picked, groups_of, taken = {}, {}, {}
  local turn = tonumber(LIMITS.turn or '0') or 0
  local queue_turn = tonumber(LIMITS.queue_turn or '0') or 0
  local from_groups = 0
  for _ = 1, 8 do
    local want = n - #picked / 2
    if want <= 0 then break end
    local heads = redis.call('ZRANGE', K_GROUPS, 0, want - 1, 'WITHSCORES')
    local qhead = redis.call('ZRANGE', K_QUEUE, 0, 0, 'WITHSCORES')
    if #heads == 0 then  -- only the ungrouped queue: the rest from it at once
      if #qhead > 0 then
        local rest = redis.call('ZPOPMIN', K_QUEUE, want)
        for i = 1, #rest do picked[#picked + 1] = rest[i] end
        turn = turn + 1
        queue_turn = turn
      end
      break
    end
    local queue_rank = #qhead > 0 and rank_of(qhead[2], queue_turn)
    local reranked, gone = {}, {}
    local i = 1
    while i <= #heads and #picked < 2 * n do
      local g, rank = heads[i], tonumber(heads[i + 1])
      turn = turn + 1
      if queue_rank and queue_rank <= rank then  -- the ungrouped queue's turn
        local one = redis.call('ZPOPMIN', K_QUEUE, 1)
        push2(picked, one[1], one[2])
        queue_turn = turn
        qhead = redis.call('ZRANGE', K_QUEUE, 0, 0, 'WITHSCORES')
        queue_rank = #qhead > 0 and rank_of(qhead[2], queue_turn)
      else
        local wait = group_blocked(g, taken, interval, slack)
        if wait == nil then
          local head = redis.call('ZPOPMIN', run_key('gq', g), 1)
          if #head > 0 then
            push2(picked, head[1], head[2])
            groups_of[head[1]] = g
            taken[g] = (taken[g] or 0) + 1
            from_groups = from_groups + 1
            -- to the back, at the priority of what it gave (its next task's, but for a
            -- mix of priorities in one group: corrected when a task is added there); an
            -- emptied group goes at its next turn
            push2(reranked, rank_of(head[2], turn), g)
          else
            gone[#gone + 1] = g
          end
        else
          gone[#gone + 1] = g
          if wait then
            redis.call('ZADD', K_PARKED, wait, g)
            due_at(wait)
          end
        end
        i = i + 2
      end
    end
    bulk_write('ZADD', K_GROUPS, reranked)
    if #gone > 0 then bulk_call('ZREM', K_GROUPS, gone) end
  end
  if from_groups > 0 then incr(K_LIMITS, 'grouped_ready', -from_groups) end
  redis.call('HSET', K_LIMITS, 'turn', turn, 'queue_turn', queue_turn)
  local first_parked = redis.call('ZRANGE', K_PARKED, 0, 0, 'WITHSCORES')
  if #first_parked > 0 then due_at(tonumber(first_parked[2])) end  -- claim again then
  return picked, groups_of
end

local popped, groups_of
local fair = redis.call('EXISTS', K_GROUPS, K_PARKED) > 0
if fair then
  popped, groups_of = pick_fairly(n)
else
  popped = redis.call('ZPOPMIN', K_QUEUE, n)
  GROUPS_USED = false  -- (what ZPOPMIN took from the queue has no group)
end
if #popped == 0 then return out end
local ids = {}
for i = 1, #popped, 2 do ids[#ids + 1] = popped[i] end
local payloads = hget_each(K_TASKS, ids)
local failures = hget_each(K_FAILURES, ids)
local delivered = hget_each(K_DELIVERIES, ids)
local expired_now = {}
if redis.call('EXISTS', K_DEADLINES) == 1 then  -- some task has a deadline: look per task
  local record_ttl = tonumber(ARGV[15]) or 0
  local due_by = hget_each(K_DEADLINES, ids)
  for i, id in ipairs(ids) do
    if payloads[i] and due_by[i] and (tonumber(due_by[i]) or 0) <= now then
      expire(id, now, due_by[i], record_ttl)
      expired_now[i] = true
    end
  end
end
for i, id in ipairs(ids) do  -- cancelled (its run, or itself): ends so, never leased
  local json = payloads[i]
  if json and not expired_now[i] then
    local until_ms = marked(id, now) or marked(string.match(json, RUN_OF), now)
    if until_ms then
      end_cancelled(id, now, until_ms - now, json)
      forget(id)
      expired_now[i] = true
    end
  end
  if MARKS == false then break end  -- nothing is cancelled: look no further
end
local deadline = now + lease_ms
local counts, leases, tokens, leased = {}, {}, {}, {}
local c = 0  -- pairs written so far (counts, leases and tokens grow in step)
local took_suspect = false
for i, id in ipairs(ids) do
  local before, bad_deliveries = count_in('deliveries', delivered[i], id)
  local failed, bad_failures = count_in('failures', failures[i], id)
  local suspect = isolate and payloads[i] and before and failed and before - failed >= 1
  if expired_now[i] then
    -- ended expired above: not leased
  elseif payloads[i] and (bad_deliveries or bad_failures) then
    if bad_deliveries then
      bury_corrupt(id, now, K_DELIVERIES, bad_deliveries)
    else
      bury_corrupt(id, now, K_FAILURES, bad_failures)
    end
  elseif payloads[i] and (took_suspect or (suspect and (not solo or c > 0))) then
    -- Not for this caller: back to its place in the queue (or its group's).
    ready_add(id, popped[2 * i])
    if suspect then out[4] = 1 end
  elseif not payloads[i] then
    -- A queue entry with no payload: nothing to run, nothing to lose. Count it and move on.
    count('orphans', 1)
    redis.call('HDEL', K_SCORES, id)
  else
    local deliveries = before + 1
    counts[#counts + 1] = id
    counts[#counts + 1] = deliveries
    local join, bad_join = join_state(id, payloads[i])
    if deliveries - failed > max_deliveries then
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
      emit(id, payloads[i], failed, deliveries, join)
      local group = groups_of and groups_of[id]
      if group then group_count(group, 1) end  -- cap or not
    end
  end
end
if interval > 0 and c > 0 then  -- each start admitted takes one interval of the limit
  tat = tat + (c / 2) * interval
  redis.call('HSET', K_LIMITS, 'tat', string.format('%.3f', tat))
  if has_ready() then due_at(tat - burst * interval) end
end
if cost_unit > 0 and c > 0 then  -- each start reserves its expected charge
  cost_tat = cost_tat + (c / 2) * cost_reserve * cost_unit
  redis.call('HSET', K_LIMITS, 'cost_tat', string.format('%.3f', cost_tat),
    'cost_unit', string.format('%.6f', cost_unit), 'cost_reserve', cost_reserve)
  if has_ready() then due_at(cost_tat) end
elseif cost_unit == 0 and LIMITS.cost_unit then
  redis.call('HDEL', K_LIMITS, 'cost_unit')  -- the limit was lifted: acks settle nothing
end
bulk_write('HSET', K_DELIVERIES, counts)
bulk_write('ZADD', K_LEASES, leases)
bulk_write('HSET', K_TOKENS, tokens)
if #leased > 0 then
  bulk_call('RPUSH', claim_key, leased)
  redis.call('PEXPIRE', claim_key, lease_ms)
end
return with_outboxed(out)
