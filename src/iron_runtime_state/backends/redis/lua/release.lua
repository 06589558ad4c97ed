-- release: drop a hold without spending, from the agent and (on a standalone server) from the
-- scopes it touched; on a cluster (budgets prefix '') the client drops the scopes' holds next
-- with scope_settle.lua. Run once per op key (see `once`), so a call resent after a lost reply
-- still gets its first answer. A release writes no event: an expired hold (this one or another of
-- the agent's) stays for the next spend, hold or commit on the agent to drop with its
-- hold_expired event.
-- KEYS: holds, op
-- ARGV: the agent's hold member, op ttl (ms), budgets prefix ('' on a cluster), the scopes'
--       hold member, the hold's scopes (comma-separated)
-- Returns 1, or -3 when the hold is not open (settled, expired or never made).
return once(KEYS[2], ARGV[2], function()
  if not take_hold(KEYS[1], ARGV[1]) then return -3 end
  if ARGV[3] ~= '' then
    for name in string.gmatch(ARGV[5], '[^,]+') do
      redis.call('ZREM', ARGV[3] .. 'holds:' .. name, ARGV[4])
    end
  end
  return 1
end)
