-- record_pii: add to an agent's pii_detections (exact 64-bit integers, as HINCRBY counts).
-- KEYS: agent, stats, finished
-- ARGV: count, now, agent_id
-- Returns {1, status, budget_spent, pii_detections, budget_limit}, or {-1} when the agent does
-- not exist.
local agent, stats = KEYS[1], KEYS[2]
local status = redis.call('HGET', agent, 'status')
if not status then return {-1} end
redis.call('HINCRBY', agent, 'pii_detections', ARGV[1])
local total = redis.pcall('HINCRBY', stats, 'pii_detections', ARGV[1])
if type(total) == 'table' and total.err then
  redis.call('HINCRBY', agent, 'pii_detections', '-' .. ARGV[1])
  return redis.error_reply('ERR the fleet total of pii_detections would overflow 64 bits')
end
redis.call('HSET', agent, 'changed_at', ARGV[2])
index_finished(KEYS[3], ARGV[3], status, status, ARGV[2])
local s, spent, pii, limit = stored_fields(agent)
return {1, s, spent, pii, limit}
