-- purge: remove the candidate agents that still have one of the statuses and last changed
-- before the cutoff (the client found them in the group's index of finished agents; this
-- checks again, atomically, so an agent changed meanwhile is left alone).
-- KEYS: stats, ids, finished, the group's running, stopped and failed sets, then agent and holds
--       for each candidate
-- ARGV: cutoff, statuses joined by ',', then the candidates' ids
-- Returns the removed ids.
local wanted = {}
for status in string.gmatch(ARGV[2], '[^,]+') do wanted[status] = true end
local cutoff = tonumber(ARGV[1])
local removed = {}
local sets = status_sets(4)
for i = 3, #ARGV do
  local base = 6 + (i - 3) * 2
  local k = {stats = KEYS[1], ids = KEYS[2], finished = KEYS[3], status = sets,
    agent = KEYS[base + 1], holds = KEYS[base + 2]}
  local f = redis.call('HMGET', k.agent, 'status', 'budget_spent', 'pii_detections', 'changed_at')
  if f[1] and wanted[f[1]] and tonumber(f[4]) < cutoff then
    drop_agent(k, ARGV[i], f)
    removed[#removed + 1] = ARGV[i]
  end
end
return removed
