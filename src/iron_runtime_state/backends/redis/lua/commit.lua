-- commit: settle a hold by recording what was really spent, even past the limit.
-- KEYS: agent, stats, holds, finished
-- ARGV: hold ("<reservation id>:<amount>"), actual, now, agent_id
-- Returns {exceeded (1 or 0), status, budget_spent, pii_detections, budget_limit}, {-3} when
-- the hold is not open (settled, expired or never made) and {-1} when the agent does not exist.
local agent = KEYS[1]
if not take_hold(KEYS[3], ARGV[1]) then return {-3} end
local f = redis.call('HMGET', agent, 'status', 'budget_spent', 'pii_detections', 'budget_limit')
if not f[1] then return {-1} end
local actual = tonumber(ARGV[2])
local spent = tonumber(f[2]) + actual
local new = num(spent)
redis.call('HSET', agent, 'budget_spent', new, 'changed_at', ARGV[3])
add_float(KEYS[2], 'budget_spent', actual)
index_finished(KEYS[4], ARGV[4], f[1], f[1], ARGV[3])
local exceeded = 0
if f[4] and exceeds(spent, tonumber(f[4])) then exceeded = 1 end
return {exceeded, f[1], new, f[3], f[4] or ''}
