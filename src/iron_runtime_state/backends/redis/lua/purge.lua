-- purge: remove the candidate agents that still have one of the statuses and last changed
-- before the cutoff (the client found them in the group's index of finished agents; this
-- checks again, atomically, so an agent changed meanwhile is left alone).
-- KEYS: stats, ids, finished, the group's running, stopped and failed sets, then agent, holds and
--       pending for each candidate
-- ARGV: cutoff, statuses joined by ',', the group's label prefix, the budgets prefix ('' on a
--       cluster), then the candidates' ids
-- Returns {the removed ids, the scope hold members the client drops (cluster)}.
local wanted = {}
for status in string.gmatch(ARGV[2], '[^,]+') do wanted[status] = true end
local cutoff = tonumber(ARGV[1])
local removed, dropped = {}, {}
local sets = status_sets(4)
for i = 5, #ARGV do
  local base = 6 + (i - 5) * 3
  local k = {stats = KEYS[1], ids = KEYS[2], finished = KEYS[3], status = sets, labels = ARGV[3],
    agent = KEYS[base + 1], holds = KEYS[base + 2], pending = KEYS[base + 3], prefix = ARGV[4],
    dropped = dropped}
  local f = redis.call('HMGET', k.agent, 'status', 'spent_micros', 'pii_detections', 'labels',
    'changed_at')
  if f[1] and wanted[f[1]] and tonumber(f[5]) < cutoff then
    drop_agent(k, ARGV[i], f)
    removed[#removed + 1] = ARGV[i]
  end
end
return {removed, dropped}
