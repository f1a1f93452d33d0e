-- fairness: the ready tasks a claim takes when the agent has groups: fairly, in rounds over
-- the rotation (see lib/groups.lua), each group within its rate and its concurrency cap.
-- Included by the scripts that list it on their `-- include:` line (scripts.py puts the
-- included files, in the order of lib/ORDER, after the key header and before the body).

-- The helpers share one picking state, `pick`: now, out (the claim's reply: out[2] is
-- next_due), n (the most to take), cap, interval and slack (the groups' limits), picked
-- ({id, score, ...} as ZPOPMIN returns), groups_of (id -> group), taken (group -> tasks
-- taken), from_groups, turn and queue_turn (the rotation's turn counters, K_LIMITS).

-- The groups' limits: count starts per window ms, cap running per group (0 = none);
-- K_LIMITS group_rate ('count/window_ms' or 'none') and group_concurrency, set live,
-- override them. Returns the cap and the rate's interval and slack (0 = no rate).
local function group_limits(limits, count, window, cap, guard)
  count, window = live_limit(limits.group_rate, count, window)
  cap = tonumber(limits.group_concurrency or '') or cap
  local interval, slack = 0, 0
  if count > 0 and window > 0 then
    interval = window / count * (1 + guard)
    slack = math.min(interval / 2, window * guard / 4)
  end
  return cap, interval, slack
end

-- Whether group g may start one more now: nil = yes (its rate's clock moves on); a time
-- (ms) = not before then (park it); false = at its concurrency cap (until a lease ends).
-- (A group paused by RateLimited is parked by release.lua until its pause ends, so one in
-- the rotation is not paused: only its cap and its rate are looked at here.)
local function group_blocked(pick, g)
  local gl = run_key('glimit', g)
  if pick.cap > 0 then
    local running = redis.pcall('HGET', K_GROUP_RUNNING, g)
    if type(running) == 'table' then running = group_count(g, 0) end  -- overwritten
    running = tonumber(running or '0') or 0
    if running + (pick.taken[g] or 0) >= pick.cap then return false end
  end
  local interval, now = pick.interval, pick.now
  if interval > 0 then
    local tat = redis.pcall('HGET', gl, 'tat')
    if type(tat) == 'table' then standing(gl, 'hash') end  -- overwritten: its clock restarts
    tat = tonumber(type(tat) == 'string' and tat or '0') or 0
    local idle = now - tat >= pick.slack
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

-- Parked groups whose time has come (at most bound of them) go back in the rotation.
local function unpark_due(now, bound)
  for _, g in ipairs(redis.call('ZRANGEBYSCORE', K_PARKED, '-inf', now, 'LIMIT', 0, bound)) do
    redis.call('ZREM', K_PARKED, g)
    rotation_touch(g)
  end
end

-- Group g's turn: it gives its head task and goes to the back (reranked), or it leaves the
-- rotation (gone): emptied, at its cap, or parked until its rate admits a start.
local function take_from_group(pick, g, reranked, gone)
  local wait = group_blocked(pick, g)
  if wait == nil then
    local head = redis.call('ZPOPMIN', run_key('gq', g), 1)
    if #head > 0 then
      push2(pick.picked, head[1], head[2])
      pick.groups_of[head[1]] = g
      pick.taken[g] = (pick.taken[g] or 0) + 1
      pick.from_groups = pick.from_groups + 1
      -- to the back, at the priority of what it gave (its next task's, but for a
      -- mix of priorities in one group: corrected when a task is added there); an
      -- emptied group goes at its next turn
      push2(reranked, rank_of(head[2], pick.turn), g)
    else
      gone[#gone + 1] = g
    end
  else
    gone[#gone + 1] = g
    if wait then
      redis.call('ZADD', K_PARKED, wait, g)
      due_at(pick.out, wait)
    end
  end
end

-- One round: the first groups of the rotation each give one task, in rank order (the
-- ungrouped queue takes its turn among them by its own rank). False when no round is left
-- to play (enough taken, or no group left: then the rest from the ungrouped queue at once).
local function pick_round(pick)
  local picked = pick.picked
  local want = pick.n - #picked / 2
  if want <= 0 then return false end
  local heads = redis.call('ZRANGE', K_GROUPS, 0, want - 1, 'WITHSCORES')
  local qhead = redis.call('ZRANGE', K_QUEUE, 0, 0, 'WITHSCORES')
  if #heads == 0 then  -- only the ungrouped queue: the rest from it at once
    if #qhead > 0 then
      local rest = redis.call('ZPOPMIN', K_QUEUE, want)
      for i = 1, #rest do picked[#picked + 1] = rest[i] end
      pick.turn = pick.turn + 1
      pick.queue_turn = pick.turn
    end
    return false
  end
  local queue_rank = #qhead > 0 and rank_of(qhead[2], pick.queue_turn)
  local reranked, gone = {}, {}
  local i = 1
  while i <= #heads and #picked < 2 * pick.n do
    local g, rank = heads[i], tonumber(heads[i + 1])
    pick.turn = pick.turn + 1
    if queue_rank and queue_rank <= rank then  -- the ungrouped queue's turn
      local one = redis.call('ZPOPMIN', K_QUEUE, 1)
      push2(picked, one[1], one[2])
      pick.queue_turn = pick.turn
      qhead = redis.call('ZRANGE', K_QUEUE, 0, 0, 'WITHSCORES')
      queue_rank = #qhead > 0 and rank_of(qhead[2], pick.queue_turn)
    else
      take_from_group(pick, g, reranked, gone)
      i = i + 2
    end
  end
  bulk_write('ZADD', K_GROUPS, reranked)
  if #gone > 0 then bulk_call('ZREM', K_GROUPS, gone) end
  return true
end

-- Up to claim.n ready tasks taken fairly, in rounds (at most 8): each group taking part goes
-- to the back of its priority. count, window, cap: the groups' limits (see group_limits).
-- Returns {id, score, ...} as ZPOPMIN would, and each grouped task's group.
local function pick_fairly(claim, count, window, cap)
  local pick = {now = claim.now, out = claim.out, n = claim.n, picked = {}, groups_of = {},
    taken = {}, from_groups = 0}
  pick.cap, pick.interval, pick.slack = group_limits(claim.limits, count, window, cap,
    claim.guard)
  unpark_due(claim.now, claim.bound)
  pick.turn = tonumber(claim.limits.turn or '0') or 0
  pick.queue_turn = tonumber(claim.limits.queue_turn or '0') or 0
  for _ = 1, 8 do
    if not pick_round(pick) then break end
  end
  if pick.from_groups > 0 then incr(K_LIMITS, 'grouped_ready', -pick.from_groups) end
  redis.call('HSET', K_LIMITS, 'turn', pick.turn, 'queue_turn', pick.queue_turn)
  local first_parked = redis.call('ZRANGE', K_PARKED, 0, 0, 'WITHSCORES')
  if #first_parked > 0 then due_at(claim.out, tonumber(first_parked[2])) end  -- claim again then
  return pick.picked, pick.groups_of
end
