"""The Lua scripts the shared store runs on the Redis server: each one atomic.

Times are the server's (`TIME`) unless the caller passes `now` (tests use a fake clock), so
replicas whose clocks differ a little still agree on windows and leases. Windows are hashes
of one-second buckets (field: the second, value: the amount); leases are sorted sets of
lease ids scored by the time they expire. Every script drops what has expired as it goes.

`redis.replicate_commands()` is called first so that `TIME` may precede writes on Redis 5
and 6 (Redis 7 and Valkey replicate effects anyway).
"""

from __future__ import annotations

PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local function clock(given)
  local now = tonumber(given)
  if now then return now end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

ADMIT = (
    PRELUDE
    + """
-- Check every subject's limits; when none is reached, count the request and take a
-- max_parallel slot, in one step.
-- KEYS: per subject: requests hash, tokens hash, parallel sorted set
-- ARGV: now ('' = server time), lease id, lease ttl (s),
--       then per subject: rpm, tpm, max_parallel (0 = none)
-- -> {admitted, per subject: requests, retry ms, reset ms, tokens, retry ms, reset ms,
--     in flight}
local now = clock(ARGV[1])
local second = math.floor(now)
local horizon = second - 60
local function window(key, limit)
  local raw = redis.call('HGETALL', key)
  local buckets, used = {}, 0
  for i = 1, #raw, 2 do
    local b = tonumber(raw[i])
    if b < horizon then
      redis.call('HDEL', key, raw[i])
    else
      local n = tonumber(raw[i + 1])
      used = used + n
      buckets[#buckets + 1] = {b, n}
    end
  end
  table.sort(buckets, function(x, y) return x[1] < y[1] end)
  local reset, retry = 0, 0
  if #buckets > 0 then reset = buckets[#buckets][1] + 61 - now end
  if used >= limit then
    local left = used
    for _, bucket in ipairs(buckets) do
      left = left - bucket[2]
      if left < limit then
        retry = bucket[1] + 61 - now
        break
      end
    end
  end
  return used, retry, reset
end
local ttl = tonumber(ARGV[3])
local n = (#ARGV - 3) / 3
local rows, admitted = {}, 1
for i = 1, n do
  local rpm = tonumber(ARGV[3 * i + 1])
  local tpm = tonumber(ARGV[3 * i + 2])
  local par = tonumber(ARGV[3 * i + 3])
  local row = {0, 0, 0, 0, 0, 0, 0}
  if rpm > 0 then
    row[1], row[2], row[3] = window(KEYS[3 * i - 2], rpm)
    if row[1] >= rpm then admitted = 0 end
  end
  if tpm > 0 then
    row[4], row[5], row[6] = window(KEYS[3 * i - 1], tpm)
    if row[4] >= tpm then admitted = 0 end
  end
  if par > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3 * i], '-inf', now)
    row[7] = redis.call('ZCARD', KEYS[3 * i])
    if row[7] >= par then admitted = 0 end
  end
  rows[i] = row
end
if admitted == 1 then
  for i = 1, n do
    local rpm, par = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 3])
    if rpm > 0 then
      redis.call('HINCRBY', KEYS[3 * i - 2], second, 1)
      redis.call('EXPIRE', KEYS[3 * i - 2], 62)
      rows[i][1] = rows[i][1] + 1
      rows[i][3] = second + 61 - now
    end
    if par > 0 then
      redis.call('ZADD', KEYS[3 * i], now + ttl, ARGV[2])
      redis.call('PEXPIRE', KEYS[3 * i], math.ceil(ttl * 2000))
      rows[i][7] = rows[i][7] + 1
    end
  end
end
local out = {admitted}
for i = 1, n do
  local r = rows[i]
  out[#out + 1] = r[1]
  out[#out + 1] = math.ceil(r[2] * 1000)
  out[#out + 1] = math.ceil(r[3] * 1000)
  out[#out + 1] = r[4]
  out[#out + 1] = math.ceil(r[5] * 1000)
  out[#out + 1] = math.ceil(r[6] * 1000)
  out[#out + 1] = r[7]
end
return out
"""
)

FINISH = (
    PRELUDE
    + """
-- A request ended: add its tokens to token windows, free its max_parallel leases and
-- count it in the day's usage, in one call.
-- KEYS: n token hashes, then m parallel sorted sets, then the usage hash (optional)
-- ARGV: now ('' = server time), n, m, tokens, lease id, usage ttl (s),
--       then usage field, amount pairs
local n, m, tokens = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if n > 0 and tokens > 0 then
  local second = math.floor(clock(ARGV[1]))
  for i = 1, n do
    redis.call('HINCRBY', KEYS[i], second, tokens)
    redis.call('EXPIRE', KEYS[i], 62)
  end
end
for i = n + 1, n + m do redis.call('ZREM', KEYS[i], ARGV[5]) end
local usage = KEYS[n + m + 1]
if usage then
  for j = 7, #ARGV, 2 do redis.call('HINCRBY', usage, ARGV[j], ARGV[j + 1]) end
  redis.call('EXPIRE', usage, ARGV[6])
end
return 1
"""
)

SLOT = (
    PRELUDE
    + """
-- Take one in-flight slot of a deployment unless `limit` are taken.
-- KEYS[1]: the deployment's leases; ARGV: now ('' = server time), limit (0 = none),
-- lease id, lease ttl (s) -> 1 taken, 0 full
local now = clock(ARGV[1])
local limit = tonumber(ARGV[2])
local ttl = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 2000))
return 1
"""
)

LEASES = (
    PRELUDE
    + """
-- Hold leases for another ttl (adding those that are missing, after a Redis restart).
-- KEYS[1]: leases; ARGV: now ('' = server time), ttl (s), lease ids...
local now = clock(ARGV[1])
local ttl = tonumber(ARGV[2])
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 2000))
return 1
"""
)

UNLOCK = """
-- Delete KEYS[1] if it holds ARGV[1] (a half-open probe this replica claimed).
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

SNAPSHOT = (
    PRELUDE
    + """
-- What the other replicas hold, for this replica's routing cache.
-- KEYS[1]: cooldowns hash; then per deployment: failures, leases, probe
-- ARGV: now (the router's clock, for failures), fail window (s), this replica's lease prefix
-- -> {cooldowns (flat hash), per deployment: others' failures, others' in flight, probe holder}
local server = clock('')
local now, span, mine = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local function others(members)
  local n = 0
  for _, m in ipairs(members) do
    if string.sub(m, 1, #mine) ~= mine then n = n + 1 end
  end
  return n
end
local out = {redis.call('HGETALL', KEYS[1])}
for i = 2, #KEYS, 3 do
  out[#out + 1] = others(redis.call('ZRANGEBYSCORE', KEYS[i], '(' .. (now - span), '+inf'))
  out[#out + 1] = others(redis.call('ZRANGEBYSCORE', KEYS[i + 1], '(' .. server, '+inf'))
  out[#out + 1] = redis.call('GET', KEYS[i + 2]) or ''
end
return out
"""
)

ALL = {
    "admit": ADMIT,
    "finish": FINISH,
    "slot": SLOT,
    "leases": LEASES,
    "unlock": UNLOCK,
    "snapshot": SNAPSHOT,
}
