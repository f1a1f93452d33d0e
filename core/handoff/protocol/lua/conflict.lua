-- conflict: a repeated key's new task takes the place of the one waiting under it.
-- include: base, groups, tasks, scopes, notices
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- ARGV[1] 'replace' | 'debounce'   ARGV[2] now in ms ('' = server TIME)
-- ARGV[3] max payload bytes   ARGV[4] the key's task id (derived from the key)
-- ARGV[5] the new task's JSON   ARGV[6] its delay, ms (0 = none)
-- A task waiting under the id (queued or delayed, not yet started) takes the new JSON:
-- replace keeps its place (its queue position or its due time); debounce moves its due
-- time to now + the delay (a burst of enqueues runs once, a delay after the last; with no
-- delay it is ready now). A started (leased), dead or finished task is left as it is.
-- Returns: 'replaced' | 'debounced', else what was found: 'absent' (nothing under the
-- id: the caller enqueues as usual), 'running', 'dead'. A JSON over the limit: an error.
local mode, now = ARGV[1], now_ms(ARGV[2])
local id, json, delay = ARGV[4], ARGV[5], tonumber(ARGV[6]) or 0
if #json > tonumber(ARGV[3]) then
  return redis.error_reply('ERR task ' .. id .. ' is ' .. #json .. ' bytes, over the limit of '
    .. ARGV[3] .. ' bytes')
end
if redis.call('HEXISTS', K_TASKS, id) == 0 then return 'absent' end
if redis.call('ZSCORE', K_LEASES, id) then return 'running' end
if redis.call('ZSCORE', K_DEAD, id) then return 'dead' end
redis.call('HSET', K_TASKS, id, json)
count('replaced', 1)
if mode ~= 'debounce' then return 'replaced' end
local delayed = redis.call('ZSCORE', K_DELAYED, id)
if delay > 0 then
  if not delayed then ready_remove(id) end
  redis.call('ZADD', K_DELAYED, now + delay, id)
elseif delayed then  -- due now: back to its place in the ready queue
  redis.call('ZREM', K_DELAYED, id)
  requeue(id, now)
  wake(1)
end
return 'debounced'
