-- conflict: a repeated key's new task, by its on_conflict (handoff/protocol/conflict.py).
-- include: base, groups, tasks, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- ARGV[1] 'replace' | 'debounce' | 'cancel_running'   ARGV[2] now in ms ('' = server TIME)
-- ARGV[3] max payload bytes   ARGV[4] the key's task id (derived from the key)
-- ARGV[5] the new task's JSON   ARGV[6] its delay, ms (debounce: debounce_s; 0 = none)
-- ARGV[7] debounce_max_s in ms (0 = none)   ARGV[8] its queue score
-- ARGV[9] how long a successor may wait, ms (its records' TTL)
-- Waiting under the id (queued or delayed, not started): that task takes the new JSON.
-- replace and cancel_running keep its place (its queue position or its due time);
-- debounce moves its due time to now + the delay, but no later than the burst's first
-- enqueue + max: the first's time is its JSON's "burst_at" (its last field), kept across
-- swaps. With no delay left it is ready now.
-- Started (leased): the new task is its successor (K_SUCCESSORS, lib/tasks.lua): it
-- takes the id once the started one has ended for good (lib/successors.lua); a later
-- enqueue takes the successor's place (the last payload wins). cancel_running also
-- cancels the started one: its worker is told at once (its handler stops), and it ends
-- cancelled once its worker lets go of it (release), or its lease runs out. A successor's
-- delay counts from when it takes the id.
-- Dead: left as it is. Nothing under the id: an old end (done, cancelled, expired) no
-- longer holds the key (clear_end): the caller enqueues the new task as usual.
-- Returns: 'replaced' | 'debounced' | 'after' (a successor) | 'cancelling' (a successor,
-- the started task told) | 'dead' | 'absent' | 'absent marked' (absent, and the old task
-- was cancelled: the caller lifts its marks in the other slots). Over the limit: an error.
local mode, now = ARGV[1], now_ms(ARGV[2])
local id, json, delay = ARGV[4], ARGV[5], tonumber(ARGV[6]) or 0
if #json > tonumber(ARGV[3]) then
  return redis.error_reply('ERR task ' .. id .. ' is ' .. #json .. ' bytes, over the limit of '
    .. ARGV[3] .. ' bytes')
end
local held = redis.call('HGET', K_TASKS, id)
if not held then return clear_end(id, now) and 'absent marked' or 'absent' end
if redis.call('ZSCORE', K_DEAD, id) then return 'dead' end
if redis.call('ZSCORE', K_LEASES, id) then
  local was = successor_of(id)
  local told = was ~= nil and string.sub(was, 1, 1) == 'c'  -- (cancelled once: it stays so)
  local keep = tonumber(ARGV[9])
  local stop = (told or mode == 'cancel_running') and 'c' or 'r'
  redis.call('HSET', K_SUCCESSORS, id, stop .. '|' .. string.format('%.0f', delay) .. '|' ..
    string.format('%.0f', now + keep) .. '|' .. ARGV[8] .. '|' .. json)
  if redis.call('PTTL', K_SUCCESSORS) < keep then redis.call('PEXPIRE', K_SUCCESSORS, keep) end
  count('successors', 1)
  if mode ~= 'cancel_running' then return 'after' end
  if not told then tell_holder(id, now, '') end
  return 'cancelling'
end
local first = now
if mode == 'debounce' then  -- the burst began with the task waiting: its "burst_at"
  first = tonumber(string.match(held, ',"burst_at":(%d+)}$') or '') or now
  json = string.gsub(json, ',"burst_at":%d+}$', ',"burst_at":' .. string.format('%.0f', first) ..
    '}')
end
redis.call('HSET', K_TASKS, id, json)
count('replaced', 1)
if mode ~= 'debounce' then return 'replaced' end
local due = now + delay
if (tonumber(ARGV[7]) or 0) > 0 then due = math.min(due, first + tonumber(ARGV[7])) end
local delayed = redis.call('ZSCORE', K_DELAYED, id)
if due > now then
  if not delayed then ready_remove(id) end
  redis.call('ZADD', K_DELAYED, string.format('%.0f', due), id)
elseif delayed then  -- due now: back to its place in the ready queue
  redis.call('ZREM', K_DELAYED, id)
  requeue(id, now)
  wake(1)
end
return 'debounced'
