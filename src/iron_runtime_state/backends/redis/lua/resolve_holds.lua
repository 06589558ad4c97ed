-- resolve_holds: on a cluster, what became of reservations whose hold on a scope expired (the
-- scope lives in another slot than the agent; see spend.py): committed (the agent's committed
-- key holds the amount charged), still open at the agent (the scope's clock ran ahead), or
-- neither (released, expired or never made: the scope drops its hold).
-- KEYS: for each reservation, the agent's holds key and its committed key
-- ARGV: for each reservation, the agent's hold member
-- Returns for each reservation its amount charged, 'open:<expiry>', or false (drop).
local now = server_now()
local verdicts = {}
for i = 1, #ARGV do
  local committed = redis.call('GET', KEYS[2 * i])
  if committed then
    verdicts[i] = committed
  else
    local expires_at = redis.call('ZSCORE', KEYS[2 * i - 1], ARGV[i])
    verdicts[i] = (expires_at and tonumber(expires_at) > now) and ('open:' .. expires_at) or false
  end
end
return verdicts
