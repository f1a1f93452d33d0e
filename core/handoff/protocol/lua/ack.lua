-- ack: finish a batch of leased tasks, token-checked, atomically.
-- include: base, groups, tasks, bulk, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- KEYS[FIXED_KEYS + 1..]  result keys, by index
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2] record TTL ms (0 = keep no record)
-- ARGV[3] n   ARGV[4] m, then m outbox fields this agent's notices were delivered from
--   (forgotten here), then n groups of 8: id, token, result_json ('' = null),
--   result_key_index, handoffs, dedupe window ms (0 = none: a task with neither a key nor
--   a parent), record extras (',"ran_ms":..' tree fields, or ''), notices (NOTICE_SEP-
--   separated, see apply_notice; '' = none; 'R' = a root that ended without handing off)
-- then ARGV[#ARGV]: the cost units the batch charged (task.charge; see claim.lua).
-- A task whose token no longer matches (its lease expired and another worker holds it, or it
-- already finished, or it appears earlier in this batch) is left exactly as it is and
-- reported, and its notices are not sent. A notice for a scope in this slot is applied
-- here; any other waits in the outbox (field '<id>:<i>') until it is delivered. The
-- bookkeeping of finished tasks is deleted in bulk commands per batch. A record the server
-- will not store is reported, and the task is finished all the same. A key's successor
-- waiting for a finished task takes its id (lib/successors.lua).
-- Returns: {stale ids..., ['|', id, error, id, error, ...] for results not stored}.
local now = now_ms(ARGV[1])
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local m = tonumber(ARGV[4])
local base = 4 + m
if m > 0 then
  local delivered = {}
  for i = 1, m do delivered[i] = ARGV[4 + i] end
  if not standing(K_OUTBOX, 'hash') then bulk_call('HDEL', K_OUTBOX, delivered) end
end
local ids = {}
for i = 1, n do ids[i] = ARGV[base + (i - 1) * 8 + 1] end
local holders = hget_each(K_TOKENS, ids)
local watching = redis.call('EXISTS', WATCHED) == 1  -- see WATCHED in lib/notices.lua
local stale, finished, seen, remembered, dropped = {}, {}, {}, {}, {}
local handed_off = 0
for i = 1, n do
  local o = base + (i - 1) * 8
  local id, token = ARGV[o + 1], ARGV[o + 2]
  if holders[i] == token and not seen[id] then
    seen[id] = true
    finished[#finished + 1] = id
    local rk = tonumber(ARGV[o + 4])
    local result = ARGV[o + 3]
    if result == '' then result = 'null' end
    if ttl > 0 and rk > 0 then
      local reply = redis.pcall('SET', KEYS[FIXED_KEYS + rk],
        '{"status":"done","finished_at":' .. now .. ARGV[o + 7] .. ',"result":' .. result .. '}',
        'PX', ttl)
      if type(reply) == 'table' and reply.err then
        dropped[#dropped + 1] = id
        dropped[#dropped + 1] = reply.err
      end
    end
    handed_off = handed_off + tonumber(ARGV[o + 5])
    local window = tonumber(ARGV[o + 6])
    if window > 0 then push2(remembered, now + window, id) end
    local notices = ARGV[o + 8]
    local watched = watching and redis.call('ZSCORE', WATCHED, id)
    if watched then result_ready(id) end
    if notices == 'R' then
      if watched then in_scope(id, id, now, root_ended, id, now, 'done', nil, result) end
    elseif notices ~= '' then
      local k, from = 0, 1
      while from <= #notices do
        local at = string.find(notices, NOTICE_SEP, from, true) or (#notices + 1)
        emit_notice(string.sub(notices, from, at - 1), id .. ':' .. k, now)
        k = k + 1
        from = at + 1
      end
    end
  else
    stale[#stale + 1] = id
  end
end
-- Cost units (task.charge): ARGV[#ARGV] is what the batch charged. Each start reserved
-- the running average charge on the limiter's clock (claim.lua); what was charged
-- replaces what was reserved, and the average moves.
local unit = redis.pcall('HGET', K_LIMITS, 'cost_unit')
if type(unit) == 'table' then standing(K_LIMITS, 'hash') end  -- overwritten: none
unit = tonumber(type(unit) == 'string' and unit or '')
if unit and #finished > 0 then
  local charged = tonumber(ARGV[#ARGV]) or 0
  local reserved = tonumber(redis.call('HGET', K_LIMITS, 'cost_reserve') or '0') or 0
  local tat = tonumber(redis.call('HGET', K_LIMITS, 'cost_tat') or '0') or 0
  tat = tat + (charged - reserved * #finished) * unit
  local average = tonumber(redis.call('HGET', K_LIMITS, 'cost_avg') or '')
  local per_task = charged / #finished
  average = average and (0.8 * average + 0.2 * per_task) or per_task
  redis.call('HSET', K_LIMITS, 'cost_tat', string.format('%.3f', tat),
    'cost_avg', string.format('%.6f', average), 'cost_used', charged)
end
if #finished > 0 then
  bulk_call('ZREM', K_LEASES, finished)
  for _, id in ipairs(finished) do lease_ended(id) end  -- (ungrouped: one EXISTS per call)
  forget_all(finished)
end
bulk_write('ZADD', K_FINISHED, remembered)
for _, id in ipairs(finished) do ended_for_good(id) end  -- a key's successor follows
promote_ended(now)
count('done', #finished)
count('handed_off', handed_off)
count('stale_acks', #stale)
count('results_dropped', #dropped / 2)
if #dropped > 0 then
  stale[#stale + 1] = '|'
  for _, item in ipairs(dropped) do stale[#stale + 1] = item end
end
return stale
