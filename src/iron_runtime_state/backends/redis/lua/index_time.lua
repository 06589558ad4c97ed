-- index_time: index by time (see `index_time`) the records not indexed yet, oldest first, a
-- chunk at a time. Needed where records were appended by a version without the index (a
-- namespace written by 0.4, or one such writer since); appends keep it while it is complete,
-- that is while the head's time_indexed is its seq.
-- KEYS: log, head, highs, lows
-- ARGV: chunk
-- Returns 1 when every record is indexed, 0 when more remain.
local log, head = KEYS[1], KEYS[2]
local h = redis.call('HMGET', head, 'seq', 'time_indexed')
local seq, done = tonumber(h[1] or '0'), tonumber(h[2] or '0')
if done >= seq then return 1 end
local chunk = tonumber(ARGV[1])
local entries = redis.call('XRANGE', log, int(done + 1), '+', 'COUNT', chunk)
for _, entry in ipairs(entries) do
  done = tonumber(string.match(entry[1], '^%d+'))
  index_time(KEYS[3], KEYS[4], done, tonumber(entry_fields(entry[2]).timestamp))
end
if #entries < chunk then done = seq end
redis.call('HSET', head, 'time_indexed', int(done))
if done >= seq then return 1 end
return 0
