-- prune_audit: remove the oldest run of records whose timestamp is before a time, at most
-- `chunk` of them per call (the client calls again while more may go), and keep the hash of the
-- last removed record as the anchor the first remaining record links to.
-- KEYS: log, head
-- ARGV: before, chunk
-- Returns {removed, 1 when the run ended (a recent record or the end of the trail) else 0}.
local log, head = KEYS[1], KEYS[2]
local before, chunk = tonumber(ARGV[1]), tonumber(ARGV[2])
local entries = redis.call('XRANGE', log, '-', '+', 'COUNT', chunk)
local removed, done = 0, 0
local last_id, last_hash
for _, entry in ipairs(entries) do
  local e = entry_fields(entry[2])
  if tonumber(e.timestamp) >= before then
    done = 1
    break
  end
  removed = removed + 1
  last_id, last_hash = entry[1], e.hash
end
if #entries < chunk then done = 1 end
if removed > 0 then
  local ms, sq = string.match(last_id, '^(%d+)-(%d+)$')
  redis.call('XTRIM', log, 'MINID', ms .. '-' .. int(tonumber(sq) + 1))
  redis.call('HSET', head, 'anchor_seq', ms, 'anchor_hash', last_hash)
end
return {removed, done}
