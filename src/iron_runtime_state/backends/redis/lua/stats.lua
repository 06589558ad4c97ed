-- stats: every group's statistics hash in one call, on a standalone server (a cluster reads them
-- with one HMGET each, pipelined per master).
-- KEYS: the groups' stats hashes; ARGV: the fields to read (keys.STATS_FIELDS)
-- Returns the HMGET reply of each group that keeps a hash (an empty group keeps none), so that
-- the client sums them as it sums the pipelined replies.
local rows = {}
for _, key in ipairs(KEYS) do
  local row = redis.call('HMGET', key, unpack(ARGV))
  if row[1] or row[2] or row[3] then rows[#rows + 1] = row end
end
return rows
