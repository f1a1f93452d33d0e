-- cancel: cancel tasks of one agent type, and mark a cancelled run or task in its slot.
-- include: base, groups, tasks, scopes, notices, successors, waits
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- KEYS[FIXED_KEYS + 1]  <base>:waiting   KEYS[FIXED_KEYS + 2]  <base>:waiting_since
--   (a parked then-task cancelled leaves both, in step: see wait.lua)
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2] how long records and the mark live, ms
-- ARGV[3] the id to mark ('' = none: see marked() in lua/lib/*.lua); with ids to cancel,
--   marked only if one of them is stored here or names an open scope here
-- ARGV[4] the list the workers answer on ('' = none)   ARGV[5..] ids of this agent's tasks
-- A leased task's worker may not have started it (a prefetched task waits for a slot):
-- its inbox entry 'id|token|seq|answer list' carries a sequence number, also kept in
-- <base>:inbox_seq:<tag>, which each claim returns to that worker: a worker hands a waiting
-- task to a slot only while it knows it has applied every cancel pushed so far (see
-- runtime/start_gate.py); it answers whether the handler had started (cancel.py waits).
-- A queued or delayed task ends cancelled here and never starts. A running one ends
-- cancelled too: its lease goes (its worker's ack or nack is stale and changes nothing,
-- whatever its handler returns), its id is marked here (extend tells its worker so) and
-- pushed to its worker's inbox, <base>:inbox:<tag> for a claim id '<tag>-...', so the
-- handler is told at once. A finished, dead or unknown task is left as it is.
-- A key's successor waiting behind a task it ends (conflict.lua) goes with it.
-- An id that names a run or a join whose scope lives here and is still open also
-- returns that scope's open tasks (the caller cancels them in turn: a whole run).
-- Returns: per id, what it was (queued | delayed | waiting | running | held (leased by a worker that
-- answers on ARGV[4] whether it had started) | done | expired | cancelled |
-- dead | unknown) and the open tasks of its scope ('' or 'id,id,...'); then, if any of
-- its ends went to another slot's scope, '|' and outbox field/notice pairs to deliver.
local K_WAITING, K_WAITING_SINCE = KEYS[FIXED_KEYS + 1], KEYS[FIXED_KEYS + 2]
local now = now_ms(ARGV[1])
local ttl = tonumber(ARGV[2])
local mark = ARGV[3]
-- Marked only when something here could still appear: an unknown id writes nothing.
local function live_here()
  for i = 5, #ARGV do
    if redis.call('HEXISTS', K_TASKS, ARGV[i]) == 1 then return true end
    if redis.call('EXISTS', run_key('scope', ARGV[i])) == 1 then return true end
  end
  return #ARGV < 5  -- a mark alone (cancel.py asked for it: the run is live)
end
if mark ~= '' and live_here() then
  local until_ms = now + ttl
  if until_ms > (tonumber(redis.call('ZSCORE', K_CANCELLED, mark) or '0') or 0) then
    redis.call('ZADD', K_CANCELLED, until_ms, mark)
  end
end

local function open_in_scope(id)
  local sk = run_key('scope', id)
  if redis.call('TYPE', sk).ok ~= 'hash' or redis.call('HEXISTS', sk, 'done') == 1 then return '' end
  local open, flat = {}, redis.call('HGETALL', sk)
  for i = 1, #flat, 2 do
    if flat[i + 1] == '1' and string.sub(flat[i], 1, 2) == 't:' then
      open[#open + 1] = string.sub(flat[i], 3)
    end
  end
  return table.concat(open, ',')
end

local function finished_as(id)
  local record = redis.call('GET', run_key('result', id))
  if record then return string.match(record, '^{"status":"(%a+)"') or 'done' end
  if redis.call('ZSCORE', K_DEAD, id) then return 'dead' end
  return 'unknown'
end

local out = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local was
  local json = redis.call('HGET', K_TASKS, id)
  if not json or redis.call('ZSCORE', K_DEAD, id) then
    was = finished_as(id)
  elseif redis.call('ZSCORE', K_LEASES, id) then
    was = 'running'  -- 'held' when its worker is asked whether it had started
    if tell_holder(id, now, ARGV[4]) and ARGV[4] ~= '' then was = 'held' end
    redis.call('ZADD', K_CANCELLED, now + ttl, id)
    redis.call('ZREM', K_LEASES, id)
    lease_ended(id)
  elseif redis.call('ZREM', K_DELAYED, id) == 1 then
    was = 'delayed'
  elseif ready_remove(id) == 1 then
    was = 'queued'
  elseif wait_tail(json) then
    was = 'waiting'  -- a Wait's then-task, parked: a signal later finds it gone
    redis.call('ZREM', K_WAITING, id)
    redis.call('ZREM', K_WAITING_SINCE, id)
  else
    was = 'queued'  -- in no set (a moment's state no script leaves): it ends all the same
  end
  if json and was ~= 'dead' then
    drop_successor(id)  -- a key's successor goes with it (the key's work is cancelled)
    end_cancelled(id, now, ttl, json)
    forget(id)
  end
  out[#out + 1] = was
  out[#out + 1] = open_in_scope(id)
end
return with_outboxed(out)
