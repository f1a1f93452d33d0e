-- restore: send cancelled tasks of a run through again, from the JSON their record kept.
-- include: base, groups, tasks, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2..] ids of this agent's cancelled tasks
-- A task whose record says cancelled and holds its JSON (end_cancelled in lua/lib/)
-- is stored again and queued at the back of its priority, with fresh attempts; its
-- record goes, and so does its refusal as a duplicate (finished). Its scope was reopened
-- first (rerun.lua), and its run's cancel mark lifted (rerun.py). A task already stored
-- (restored by an earlier call) or whose record is no longer a cancelled one is left.
-- Returns: the ids restored.
local CANCELLED_TASK = '^{"status":"cancelled","finished_at":%d+,"task":(.*)}$'
local now = now_ms(ARGV[1])
local restored = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local rk = run_key('result', id)
  local json = string.match(redis.call('GET', rk) or '', CANCELLED_TASK)
  if json and redis.call('HEXISTS', K_TASKS, id) == 0 then
    local ok, task = pcall(cjson.decode, json)
    local priority = ok and type(task) == 'table' and tonumber(task.priority) or 0
    local score = string.format('%.0f', priority * PRIORITY_SHIFT + (now - EPOCH_MS))
    redis.call('HSET', K_TASKS, id, json)
    redis.call('HSET', K_SCORES, id, score)
    redis.call('ZREM', K_FINISHED, id)
    redis.call('DEL', rk)
    local group = string.match(json, GROUP_OF_JSON)
    if group then group_set(id, group) end
    ready_add(id, score, group)
    restored[#restored + 1] = id
  end
end
count('enqueued', #restored)
wake(#restored)
return restored
