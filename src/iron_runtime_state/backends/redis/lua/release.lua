-- release: drop a hold without spending.
-- KEYS: holds
-- ARGV: hold ("<reservation id>:<amount>")
-- Returns 1, or -3 when the hold is not open (settled, expired or never made).
if not take_hold(KEYS[1], ARGV[1]) then return -3 end
return 1
