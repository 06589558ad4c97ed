-- reserved: an agent's state and the sum of its open holds (expired ones are dropped).
-- KEYS: agent, holds
-- Returns {1, status, budget_spent, pii_detections, budget_limit, reserved}, or {-1} when the
-- agent does not exist.
local f = redis.call('HMGET', KEYS[1], 'status', 'budget_spent', 'pii_detections', 'budget_limit')
if not f[1] then return {-1} end
local reserved = open_holds(KEYS[2])
return {1, f[1], f[2], f[3], f[4] or '', num(reserved)}
