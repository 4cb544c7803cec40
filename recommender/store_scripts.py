"""The Lua scripts the Store runs in Redis (recommender/store.py documents the key layout).

Each runs atomically in one round trip, on redis-server and on fakeredis (embedded mode) alike.
"""

# KEYS: coread:{item}, then coread:{j} per window book; ARGV: keep, cap, item, then the window books.
COREAD_SCRIPT = """
local keep, cap, item = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for n = 2, #KEYS do
  redis.call('ZINCRBY', KEYS[1], 1, ARGV[n + 2])
  redis.call('ZINCRBY', KEYS[n], 1, item)
end
for n = 1, #KEYS do
  local size = redis.call('ZCARD', KEYS[n])
  if size > cap then redis.call('ZREMRANGEBYRANK', KEYS[n], 0, size - keep - 1) end
end
return #KEYS - 1
"""
# The co-read scores of a user's recent books, computed where the lists live (the reply is the best
# candidates, not every neighbour of every book). KEYS: popular, then coread:{i} per recent book i.
# ARGV: per-book k, top, #recent, #exclude, the recent books, the excluded ids, then ids whose count
# is also wanted. cf(j) = sum over recent i of c_ij / sqrt(n_i * n_j), summed in the order of the
# recent books and of each list (strongest first), as blend.py documents; because(j) = the i of the
# largest part (the first on a tie). Returns {n of each recent book, flat (j, cf, because, n_j) for
# every j whose cf is at least the top-th best (ties kept: the caller orders them by id), n of each
# also id}; cf as '%.17g' text, exact (a Lua number would come back truncated to an integer).
COREAD_SCORES_SCRIPT = """
local k, top, n_recent, n_ex = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function counts(ids)  -- ZMSCORE in chunks: unpack() is bounded by Lua's C stack
  local out = {}
  for first = 1, #ids, 1000 do
    local part = redis.call('ZMSCORE', KEYS[1], unpack(ids, first, math.min(first + 999, #ids)))
    for n = 1, #part do out[#out + 1] = part[n] end
  end
  return out
end
local recent, excluded, also = {}, {}, {}
for a = 1, n_recent do recent[a] = ARGV[4 + a] end
for a = 1, n_ex do excluded[ARGV[4 + n_recent + a]] = true end
for a = 5 + n_recent + n_ex, #ARGV do also[#also + 1] = ARGV[a] end
local n_of_recent = #recent > 0 and counts(recent) or {}
local rows, ids, known = {}, {}, {}  -- rows: each book's flat (j, count, ...) reply, as it came
for r = 1, n_recent do
  rows[r] = {}
  if n_of_recent[r] and tonumber(n_of_recent[r]) > 0 then
    rows[r] = redis.call('ZREVRANGE', KEYS[1 + r], 0, k - 1, 'WITHSCORES')
    for a = 1, #rows[r], 2 do
      local j = rows[r][a]
      if not known[j] and not excluded[j] then known[j] = true; ids[#ids + 1] = j end
    end
  end
end
local n_of = {}  -- j -> n_j (a whole number: it comes back as a Redis integer)
for a, c in ipairs(#ids > 0 and counts(ids) or {}) do
  if c then n_of[ids[a]] = tonumber(c) end
end
local total, best, because, order = {}, {}, {}, {}
local sqrt = math.sqrt
for r = 1, n_recent do
  local n_i, row, book = tonumber(n_of_recent[r]), rows[r], recent[r]
  for a = 1, #row, 2 do
    local j = row[a]
    local n_j = n_of[j]  -- nil for an excluded id or one nobody has read (n_j = 0)
    if n_j and n_j > 0 then
      local part = tonumber(row[a + 1]) / sqrt(n_i * n_j)
      local sum = total[j]
      if not sum then sum = 0.0; best[j] = 0.0; order[#order + 1] = j end
      total[j] = sum + part
      if part > best[j] then best[j] = part; because[j] = book end
    end
  end
end
local floor = -math.huge
if #order > top then
  local values = {}
  for a, j in ipairs(order) do values[a] = total[j] end
  table.sort(values)
  floor = top > 0 and values[#values - top + 1] or math.huge
end
local picked = {}
for _, j in ipairs(order) do
  if total[j] >= floor then
    picked[#picked + 1] = j
    picked[#picked + 1] = string.format('%.17g', total[j])
    picked[#picked + 1] = because[j]
    picked[#picked + 1] = n_of[j]
  end
end
return {n_of_recent, picked, #also > 0 and counts(also) or {}}
"""

# KEYS: the live-items set, then one item hash per item. ARGV: ITEM_ARGS values per item. An event
# is written unless the stored version is newer; returns the 1-based positions of those written.
ITEM_ARGS = ("item_id", "ts", "event_id", "deleted", "title", "authors", "year", "tags", "image_url",
             "text", "emb")
ITEM_WRITE_LUA = """
-- (ts, id) older than (sts, sid)? Event ids compare byte by byte (Lua's string '<' follows the
-- server's locale; bytes of UTF-8 order as Python orders the code points).
local function older(ts, id, sts, sid)
  local a, b = tonumber(ts), tonumber(sts)
  if a ~= b then return a < b end
  for i = 1, math.min(#id, #sid) do
    local x, y = string.byte(id, i), string.byte(sid, i)
    if x ~= y then return x < y end
  end
  return #id < #sid
end
local written = {}
for i = 1, #KEYS - 1 do
  local key, a = KEYS[i + 1], (i - 1) * 11
  local item_id, ts, id, deleted = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local stored = redis.call('HMGET', key, 'ts', 'event_id')
  if not stored[1] or not older(ts, id, stored[1], stored[2] or '') then
    if deleted == '1' then  -- a tombstone: a late, older upsert cannot bring the item back
      redis.call('DEL', key)
      redis.call('HSET', key, 'ts', ts, 'event_id', id, 'deleted', '1')
      redis.call('SREM', KEYS[1], item_id)
    else
      redis.call('HSET', key, 'ts', ts, 'event_id', id, 'deleted', '0', 'title', ARGV[a + 5],
                 'authors', ARGV[a + 6], 'year', ARGV[a + 7], 'tags', ARGV[a + 8],
                 'image_url', ARGV[a + 9], 'text', ARGV[a + 10], 'emb', ARGV[a + 11])
      redis.call('SADD', KEYS[1], item_id)
    end
    written[#written + 1] = i
  end
end
return written
"""
