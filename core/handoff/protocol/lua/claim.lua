-- claim: lease up to n ready tasks of one agent type, atomically, in one call.
-- include: base, groups, tasks, bulk, scopes, notices, successors, admission, fairness, leasing
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- KEYS[FIXED_KEYS + 1]  this claim's replay key (LIST of the ids it leased)
-- ARGV[1] n (capped at ARGV[7])   ARGV[2] lease_ms      ARGV[3] claim_id (the lease token)
-- ARGV[4] max_deliveries          ARGV[5] global_limit (0 = none)
-- ARGV[6] now in ms ('' = server TIME)                    ARGV[7] cap on n
-- ARGV[8] promote/reap/unpark bound per call
-- ARGV[9] '1' = isolate suspects      ARGV[10] '1' = the caller holds no other task (solo)
-- ARGV[11] the agent's declared start rate: starts per window ('' or 0 = none), ARGV[12]
--   the window ms, ARGV[13] burst; a rate set live in K_LIMITS ('count/window_ms', or
--   'none') overrides them. Starts are admitted by GCRA (see handoff/protocol/limits.py),
--   spaced GUARD (ARGV[14], a fraction: also for group rates and cost units) wider than
--   the rate; an agent paused (a handler raised RateLimited: K_LIMITS paused_until) admits
--   nothing until then. When the rate or the pause holds tasks back, next_due says when
--   to claim again (lib/admission.lua).
-- ARGV[15] record TTL ms: a task popped after its deadline (K_DEADLINES) is not leased but
--   ends expired, its record kept this long (see expire in lib/notices.lua). A task of a
--   cancelled run (K_CANCELLED) is not leased either: it ends cancelled.
-- ARGV[16] the groups' rate: starts per group per ARGV[17] window ms ('' or 0 = none);
--   ARGV[18] the most running per group (0 = none); K_LIMITS group_rate ('count/window_ms'
--   or 'none') and group_concurrency, set live, override them (lib/fairness.lua).
-- ARGV[19] cost units (cost_limit, task.charge) per ARGV[20] window ms ('' or 0 = none);
--   K_LIMITS cost_limit ('count/window_ms' or 'none'), set live, overrides them. A start
--   reserves the average charge so far; its ack settles what it charged (lib/admission.lua).
-- A suspect was delivered before and neither finished nor failed: its worker died or
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
-- The full claim. Its steps are helpers working on this call's state table, `claim`:
-- lib/leasing.lua (a replay, what ends unleased, the lease of each task), lib/admission.lua
-- (the pause, the start rate, cost units) and lib/fairness.lua (groups taken fairly).
local claim_key = KEYS[FIXED_KEYS + 1]
local n = math.min(tonumber(ARGV[1]), tonumber(ARGV[7]))
local lease_ms, token = tonumber(ARGV[2]), ARGV[3]
local max_deliveries = tonumber(ARGV[4])
local global_limit = tonumber(ARGV[5])
local now = now_ms(ARGV[6])
local inbox_tag = string.match(token, '^(%w+)%-')
local out = {now, -1, inbox_tag and redis.call('GET', run_key('inbox_seq', inbox_tag)) or 0}
local claim = {
  n = n, lease_ms = lease_ms, token = token, now = now, out = out,
  max_deliveries = max_deliveries, bound = tonumber(ARGV[8]), isolate = ARGV[9] == '1',
  solo = ARGV[10] == '1', guard = tonumber(ARGV[14]) or 0,
}
if claim.isolate then out[4] = 0 end

-- A retried claim: return what the first call leased and still holds; lease nothing new.
if redis.call('EXISTS', claim_key) == 1 then return claim_replay(claim, claim_key) end

wake(promote_due(now, claim.bound) + reap_expired(now, claim.bound))
expire_finished(now, claim.bound)
promote_ended(now)  -- a lease a key's successor cancelled ended (reap_expired)
local head = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
if #head > 0 then out[2] = tonumber(head[2]) end

if global_limit > 0 then
  claim.n = math.min(claim.n, global_limit - redis.call('ZCARD', K_LEASES))
end
if claim.n <= 0 then return out end

-- The pause, the start rate (ARGV[11..13]) and cost units (ARGV[19..20]) cap claim.n.
claim.limits = read_limits()
if not admit(claim, tonumber(ARGV[11]) or 0, tonumber(ARGV[12]) or 0, tonumber(ARGV[13]) or 0,
    tonumber(ARGV[19]) or 0, tonumber(ARGV[20]) or 0) then
  return out
end

local popped, groups_of
if redis.call('EXISTS', K_GROUPS, K_PARKED) > 0 then  -- by groups' limits (ARGV[16..18])
  popped, groups_of = pick_fairly(claim, tonumber(ARGV[16]) or 0, tonumber(ARGV[17]) or 0,
    tonumber(ARGV[18]) or 0)
else
  popped = redis.call('ZPOPMIN', K_QUEUE, claim.n)
  GROUPS_USED = false  -- (what ZPOPMIN took from the queue has no group)
end
if #popped == 0 then return out end
local ids = {}
for i = 1, #popped, 2 do ids[#ids + 1] = popped[i] end
local payloads = hget_each(K_TASKS, ids)
local failures = hget_each(K_FAILURES, ids)
local delivered = hget_each(K_DELIVERIES, ids)
local ended = end_unleasable(now, ids, payloads, tonumber(ARGV[15]) or 0)
local counts, leases, tokens, leased = lease_each(claim, {ids = ids, popped = popped,
  payloads = payloads, failures = failures, delivered = delivered, ended = ended,
  groups_of = groups_of})
charge_starts(claim, #leased)
bulk_write('HSET', K_DELIVERIES, counts)
bulk_write('ZADD', K_LEASES, leases)
bulk_write('HSET', K_TOKENS, tokens)
if #leased > 0 then
  bulk_call('RPUSH', claim_key, leased)
  redis.call('PEXPIRE', claim_key, lease_ms)
end
promote_ended(now)  -- what ended above (expired, cancelled, dead) with a key's successor
return with_outboxed(out)
