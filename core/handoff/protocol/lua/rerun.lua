-- rerun: reopen a run's or a join's scope for tasks of it that are sent through again.
-- include: base, groups, tasks, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the fixed keys of the scope's agent (a run: its root's; a join: its
--                      then-task's), the key header, scripts.py
-- ARGV[1] the scope's id (the run's root, or the join's then-task)   ARGV[2] the run's id
-- ARGV[3] the join's then-task to fire again when its branches end ('' = none): it was
--         dead-lettered (a join with on_dead="fail") or cancelled; it leaves the dead
--         letters (or its cancelled record) and waits in the scope again, as before it fired
-- ARGV[4..] the ids of the scope's tasks that run again (dead ones, requeued after this)
-- Each id is open in the scope again (counted in n), its end is taken out of the scope's
-- ends (and out of its first dead end), and the scope is no longer ended: a run's waiters
-- block again until it ends anew, a join fires its then-task once its branches end.
-- Idempotent: a repeat (a rerun that stopped half-way, run again) changes nothing more.
-- Returns: {reopened, rearmed} or {'gone'} (no such scope: its records expired).
local CANCELLED_TASK = '^{"status":"cancelled","finished_at":%d+,"task":(.*)}$'
local scope, run, then_id = ARGV[1], ARGV[2], ARGV[3]
local sk, ek = run_key('scope', scope), run_key('ends', scope)
if redis.call('TYPE', sk).ok ~= 'hash' then return {'gone'} end
local again, reopened = {}, 0
for i = 4, #ARGV do
  local id = ARGV[i]
  again[id] = true
  if redis.call('HGET', sk, 't:' .. id) ~= '1' then
    redis.call('HSET', sk, 't:' .. id, '1')
    redis.call('HINCRBY', sk, 'n', 1)
    reopened = reopened + 1
  end
end
-- The ends, each a JSON object followed by a comma: split where a comma follows a whole
-- object (outside strings), keep those of tasks not run again.
local raw = redis.call('GET', ek) or ''
local kept, first_dead = {}, nil
local depth, in_str, esc, from = 0, false, false, 1
for i = 1, #raw do
  local c = string.byte(raw, i)
  if in_str then
    if esc then esc = false elseif c == 92 then esc = true elseif c == 34 then in_str = false end
  elseif c == 34 then in_str = true
  elseif c == 123 or c == 91 then depth = depth + 1
  elseif c == 125 or c == 93 then depth = depth - 1
  elseif c == 44 and depth == 0 then
    local one = string.sub(raw, from, i - 1)
    from = i + 1
    local ok, e = pcall(cjson.decode, one)
    if ok and type(e) == 'table' and again[e.id] then
      redis.call('HINCRBY', sk, 'c:' .. tostring(e.branch or 0), -1)
    else
      kept[#kept + 1] = one
      if ok and type(e) == 'table' and e.status ~= 'done' and not first_dead then
        first_dead = one
      end
    end
  end
end
if #kept > 0 then
  redis.call('SET', ek, table.concat(kept, ',') .. ',')
else
  redis.call('DEL', ek)
end
if first_dead then redis.call('HSET', sk, 'dead', first_dead) else redis.call('HDEL', sk, 'dead') end
redis.call('HDEL', sk, 'done')
redis.call('PERSIST', sk)  -- kept until it ends again (then for `keep` ms, as before)
if scope == run then redis.call('DEL', run_key('ended', run)) end
-- The then-task leaves its dead letter, or its cancelled record, to wait in its join.
local rearmed = 0
if then_id ~= '' and redis.call('HEXISTS', sk, 'then') == 0 then
  local json
  if redis.call('ZSCORE', K_DEAD, then_id) then
    json = redis.call('HGET', K_TASKS, then_id)
    redis.call('ZREM', K_DEAD, then_id)
    redis.call('HDEL', K_DEAD_REASONS, then_id)
    forget(then_id)
  else
    json = string.match(redis.call('GET', run_key('result', then_id)) or '', CANCELLED_TASK)
    if json then redis.call('DEL', run_key('result', then_id)) end
  end
  if json then
    redis.call('HSET', sk, 'then', json)
    redis.call('ZREM', K_FINISHED, then_id)
    rearmed = 1
  end
end
count('rerun_reopened', reopened)
return {reopened, rearmed}
