-- admission: how many tasks a claim may start now, by the agent's limits (a pause, the start
-- rate, cost units: K_LIMITS, read once), and what the starts it made take of them.
-- Included by the scripts that list it on their `-- include:` line (scripts.py puts the
-- included files, in the order of lib/ORDER, after the key header and before the body).

-- These work on claim.lua's state table, `claim`: now, n (the most it may start: lowered
-- here), out (its reply: out[2] is next_due), limits (K_LIMITS as read by read_limits),
-- guard (ARGV[14]: admissions spaced that fraction wider than a rate). admit() sets what
-- charge_starts() needs after the leases: interval, tat, burst, cost_unit, cost_reserve,
-- cost_tat.

-- Whether anything is ready to start (the ungrouped queue, or a group in the rotation).
local function has_ready()
  return redis.call('ZCARD', K_QUEUE) > 0 or redis.call('EXISTS', K_GROUPS) == 1
end

-- Claim again at ms: the reply's next_due (out[2]) moves there if that is sooner.
local function due_at(out, ms)
  if out[2] < 0 or ms < out[2] then out[2] = math.ceil(ms) end
end

-- The agent's limiter state, read once: rate, burst, tat, paused_until, cost_*, turns.
local function read_limits()
  standing(K_LIMITS, 'hash')
  local limits = {}
  local flat = redis.call('HGETALL', K_LIMITS)
  for i = 1, #flat, 2 do limits[flat[i]] = flat[i + 1] end
  return limits
end

-- A limit set live ('count/window_ms', or 'none' = lifted) overrides the code's.
local function live_limit(live, count, window)
  if live == 'none' then return 0, window end
  local c, w = string.match(live or '', '^([%d.]+)/(%d+)$')
  if c then return tonumber(c), tonumber(w) end
  return count, window
end

-- The start rate: count starts per window ms with burst (K_LIMITS rate and burst, set live,
-- override them), admitted by GCRA (see handoff/protocol/limits.py). False if it admits
-- nothing now (next_due says when); else claim.n is capped at what it admits.
local function admit_rate(claim, count, window, burst)
  local limits, now = claim.limits, claim.now
  count, window = live_limit(limits.rate, count, window)
  if limits.rate then burst = tonumber(limits.burst or '') or burst end
  local interval, tat = 0, 0
  if count > 0 and window > 0 then
    local guard = claim.guard
    interval = window / count * (1 + guard)
    -- A claim late by less than `slack` keeps the schedule (the rate is held whatever the
    -- claimers' punctuality); later than that, the schedule starts again from now.
    local slack = math.min(interval / 2, window * guard / 4)
    tat = tonumber(limits.tat or '0') or 0
    -- Later than that, it starts again from now (a rate faster than a start per ms: from
    -- the start of this ms, whose starts one claim then admits; no other credit is kept).
    if now - tat >= slack then tat = math.max(tat, now - math.max(0, 1 - interval)) end
    local allowed = math.floor((now + burst * interval - tat) / interval) + 1
    if allowed <= 0 then
      if has_ready() then due_at(claim.out, tat - burst * interval) end
      return false
    end
    claim.n = math.min(claim.n, allowed)
  end
  claim.interval, claim.tat, claim.burst = interval, tat, burst
  return true
end

-- Cost units (cost_limit, task.charge): count units per window ms; K_LIMITS cost_limit
-- ('count/window_ms' or 'none') set live overrides them. A GCRA clock in units
-- (cost_tat): each start reserves the average charge so far (a whole window's worth
-- before the first charge is known, so one task runs alone until its charge lands), and
-- the ack replaces the reservation with what was charged. A spent window stops claims
-- until it refills; the starts a window holds follow what the tasks really charge.
local function admit_cost(claim, count, window)
  local limits, now = claim.limits, claim.now
  count, window = live_limit(limits.cost_limit, count, window)
  local unit, reserve, tat = 0, 0, 0
  if count > 0 and window > 0 then
    unit = window / count * (1 + claim.guard)
    reserve = tonumber(limits.cost_avg or '') or count
    tat = tonumber(limits.cost_tat or '0') or 0
    if tat < now then tat = now end  -- no credit saved up: no burst
    if reserve > 0 then
      if tat > now then
        if has_ready() then due_at(claim.out, tat) end
        return false
      end
      claim.n = math.min(claim.n, 1)  -- spaced: the next start waits for this one's reservation
    end
  end
  claim.cost_unit, claim.cost_reserve, claim.cost_tat = unit, reserve, tat
  return true
end

-- Whether the claim may start anything now: not while the agent is paused (a handler raised
-- RateLimited: K_LIMITS paused_until), nor beyond its start rate (rate, window, burst) or
-- its cost units (cost, cost_window). False = start nothing (next_due says when, if
-- anything is ready); else claim.n is capped at what they admit.
local function admit(claim, rate, window, burst, cost, cost_window)
  local paused = tonumber(claim.limits.paused_until or '0') or 0
  if paused > claim.now then
    if has_ready() then due_at(claim.out, paused) end
    return false
  end
  return admit_rate(claim, rate, window, burst) and admit_cost(claim, cost, cost_window)
end

-- After the leases: each of the `started` starts takes one interval of the start rate and
-- reserves its expected charge of cost units.
local function charge_starts(claim, started)
  if claim.interval > 0 and started > 0 then  -- each start admitted takes one interval
    claim.tat = claim.tat + started * claim.interval
    redis.call('HSET', K_LIMITS, 'tat', string.format('%.3f', claim.tat))
    if has_ready() then due_at(claim.out, claim.tat - claim.burst * claim.interval) end
  end
  if claim.cost_unit > 0 and started > 0 then  -- each start reserves its expected charge
    claim.cost_tat = claim.cost_tat + started * claim.cost_reserve * claim.cost_unit
    redis.call('HSET', K_LIMITS, 'cost_tat', string.format('%.3f', claim.cost_tat),
      'cost_unit', string.format('%.6f', claim.cost_unit), 'cost_reserve', claim.cost_reserve)
    if has_ready() then due_at(claim.out, claim.cost_tat) end
  elseif claim.cost_unit == 0 and claim.limits.cost_unit then
    redis.call('HDEL', K_LIMITS, 'cost_unit')  -- the limit was lifted: acks settle nothing
  end
end
