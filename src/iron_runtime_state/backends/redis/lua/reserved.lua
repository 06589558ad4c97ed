-- reserved: an agent's state and the sum of its open holds (expired ones are dropped), pending
-- holds of spends under way on a cluster included.
-- KEYS: agent, holds, pending
-- Returns {1, state (see state_reply), reserved}, {-1} when the agent does not exist, or {LEGACY}
-- when it is stored as 0.4/0.5 wrote it (the client reads it itself).
local f = redis.call('HMGET', KEYS[1], unpack(AGENT_FIELDS))
if not f[1] then return {-1} end
if not f[2] then return {LEGACY} end
local reply = state_reply(1, f)
reply[12] = int(held_at(KEYS[2], server_now()) + all_holds(KEYS[3], 0))
return reply
