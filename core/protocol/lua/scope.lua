-- scope: apply notices to runs and joins whose scope lives in this agent's slot.
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (see _prelude.lua)
-- ARGV[1] now in ms ('' = server TIME), ARGV[2..] notices (see apply_notice)
-- Idempotent: a notice applied twice (a retried call, the reaper delivering what a worker
-- also delivered) changes nothing the second time. A join whose last branch ends here
-- enqueues its then-task in this same call.
-- Returns: the number of notices applied.
local now = now_ms(ARGV[1])
for i = 2, #ARGV do apply_notice(ARGV[i], now, '') end
return #ARGV - 1
