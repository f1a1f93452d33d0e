-- extend: renew the leases of running tasks, token-checked, atomically.
-- include: base, groups, tasks, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2] lease_ms
-- ARGV[3] n, then n groups of 2: id, token
-- Returns: the ids whose token no longer matches (the lease was lost: abandon the task),
-- then '|' and those of them that were cancelled (see cancel.lua: stop their handlers),
-- and those held still that a key's successor cancelled (conflict.lua: the same).
local now = now_ms(ARGV[1])
local deadline = now + tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local lost, cancelled = {}, {}
for i = 0, n - 1 do
  local id, token = ARGV[4 + i * 2], ARGV[5 + i * 2]
  if redis.call('HGET', K_TOKENS, id) == token then
    redis.call('ZADD', K_LEASES, 'XX', deadline, id)
    -- cancelled by a key's successor: said again at each renewal, should its worker have
    -- missed it (its handler stops, then it lets go: lib/successors.lua)
    if stopping(id) then cancelled[#cancelled + 1] = id end
  else
    lost[#lost + 1] = id
    if marked(id, now) then cancelled[#cancelled + 1] = id end
  end
end
lost[#lost + 1] = '|'
for _, id in ipairs(cancelled) do lost[#lost + 1] = id end
return lost
