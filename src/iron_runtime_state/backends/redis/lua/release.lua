-- release: drop a hold without spending. Run once per op key (see `once`), so a call resent after
-- a lost reply still gets its first answer.
-- KEYS: holds, outbox (unused: a release writes no event), op
-- ARGV: hold ("<reservation id>:<amount>"), op ttl (ms)
-- Returns 1, or -3 when the hold is not open (settled, expired or never made).
return once(KEYS[3], ARGV[2], function()
  if not take_hold(KEYS[1], ARGV[1]) then return -3 end
  return 1
end)
