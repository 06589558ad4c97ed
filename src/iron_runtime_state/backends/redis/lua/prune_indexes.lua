-- prune_indexes: after a prune, drop the pruned seqs from some audit index keys, and forget the
-- keys left empty. Queries already ignore seqs at or below the anchor, so this is only cleanup.
-- KEYS: index registry, then index keys
-- ARGV: anchor seq
-- Returns how many index keys were visited.
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
  if redis.call('EXISTS', KEYS[i]) == 0 then redis.call('SREM', KEYS[1], KEYS[i]) end
end
return #KEYS - 1
