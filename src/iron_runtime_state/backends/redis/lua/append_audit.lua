-- append_audit: append a batch of sealed records to the audit stream, all or none.
-- The client hashed the batch against the head it believed current; the batch is appended only
-- if the head is still that one (compare-and-set), otherwise the current head comes back and
-- the client seals again on top of it. So concurrent appenders extend one chain.
-- Each record's entry id is "<seq>-0"; per-agent and per-type sorted sets index its seq.
-- KEYS: log, head, index registry, then every index key the batch touches
-- ARGV: expected seq, expected hash, then for each record: agent_id, event_type, timestamp,
--       details, hash, and the KEYS positions of its agent index and its type index
-- Returns {1} when appended, {0, seq, hash} (the current head) when the head had moved.
local log, head = KEYS[1], KEYS[2]
local h = redis.call('HMGET', head, 'seq', 'hash')
local seq = tonumber(h[1] or '0')
local prev = h[2] or GENESIS_HASH
if int(seq) ~= ARGV[1] or prev ~= ARGV[2] then return {0, int(seq), prev} end
for i = 3, #ARGV, 7 do
  seq = seq + 1
  local s = int(seq)
  redis.call('XADD', log, s .. '-0', 'agent_id', ARGV[i], 'event_type', ARGV[i + 1],
    'timestamp', ARGV[i + 2], 'details', ARGV[i + 3], 'prev_hash', prev, 'hash', ARGV[i + 4])
  redis.call('ZADD', KEYS[tonumber(ARGV[i + 5])], s, s)
  redis.call('ZADD', KEYS[tonumber(ARGV[i + 6])], s, s)
  prev = ARGV[i + 4]
end
redis.call('HSET', head, 'seq', int(seq), 'hash', prev)
redis.call('SADD', KEYS[3], unpack(KEYS, 4))
return {1}
