-- Pool chunks (issue 18): a map's chunk travels as a slice of the
-- caller's table (q:_put_slice: no table cut for it), its results come
-- back the same way and are decoded straight into the map's result
-- table (q:_get_items(dests, k)), and a worker counts the items a failed
-- chunk finished from its stack instead of per item.  What the caller
-- sees must not change: order, nils, holes, errors at their item.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local err_of, range = H.err_of, H.range

describe("Queue slices", function()
  it("_put_slice sends items first..last of a table, holes as nil", function()
    local q = core.Queue()
    local t = {10, 20, nil, 40, 50, n = 5}
    q:_put_slice(7, 2, 2, 5, "a", t, "z")
    local m = q:get()
    assert.equal("a", m[1])
    assert.equal("z", m[3])
    assert.same({20, nil, 40, 50}, {m[2][1], m[2][2], m[2][3], m[2][4]})
    assert.is_nil(next(m[2], 4))
    assert.is_nil(m[2].n)            -- the items only, not the table
    -- an empty range is an empty array
    q:_put_slice(1, 1, 3, 2, t)
    assert.same({{}}, q:get())
    -- the record carries the tag, as _put_task's does
    local slots = core.Queue{slots = 1}
    slots:_put_slice(42, 1, 1, 1, {"x"})
    assert.same({{"x"}}, slots:_get_slot(0))
    assert.equal(42, slots:_taken(0))
    q:close()
    slots:close()
  end)

  it("_put_slice refuses what it cannot send, and puts nothing", function()
    local q = core.Queue()
    assert.matches("no such value", tostring(err_of(q._put_slice, q, 1, 3, 1, 2, "a")))
    assert.matches("table expected", tostring(err_of(q._put_slice, q, 1, 1, 1, 2, "a")))
    local err = err_of(q._put_slice, q, 1, 2, 1, 3, "x", {1, coroutine.create(print), 3})
    assert.equal("EncodeError", err.kind)
    assert.matches("at value%[2%]%[2%]", err.message)
    assert.same({2, 2}, err.path)
    assert.is_true(q:empty())
    q:close()
  end)

  it("_get_items(dests, k) decodes item k into the table dests[tag] names", function()
    local q = core.Queue()
    local T = {}
    q:_put_slice(5, 4, 1, 3, 5, 0, 3, {"x", "y", "z"})
    local a, b, c, d = q:_get_items({[5] = {into = T, at = 10}}, 4)
    assert.same({5, 0, 3}, {a, b, c})
    assert.is_true(rawequal(T, d))
    assert.same({"x", "y", "z"}, {T[11], T[12], T[13]})
    assert.is_nil(T[10])
    assert.is_nil(T[14])
    -- no entry for the tag, an entry without into or at: a table of its own
    for _, dests in ipairs {{}, {[6] = {at = 1}}, {[6] = {into = T}},
                            {[6] = {into = T, at = 1.5}}} do
      q:_put_slice(6, 1, 1, 2, {"p", "q"})
      local got = q:_get_items(dests, 1)
      assert.is_false(rawequal(T, got))
      assert.same({"p", "q"}, got)
    end
    -- an item that is not an array is decoded as it is
    q:_put_task(5, "one", {k = 1})
    local one, map = q:_get_items({[5] = {into = T, at = 0}}, 2)
    assert.equal("one", one)
    assert.same({k = 1}, map)
    assert.is_nil(T[1])
    -- untagged (put): no lookup
    q:put({1, {2}})
    local x, y = q:_get_items({[0] = {into = T, at = 0}}, 2)
    assert.same({1, {2}}, {x, y})
    -- empty: nothing
    assert.equal(0, select("#", q:_get_items({}, 4)))
    assert.matches("item must be >= 1", tostring(err_of(q._get_items, q, {}, 0)))
    q:close()
  end)
end)

describe("Pool chunked maps", function()
  local pool
  setup(function() pool = mp.Pool(2) end)
  teardown(function() pool:terminate() end)

  it("results land in the caller's result table in order, nils and holes too", function()
    local r = pool:map(function(x)
      if x % 3 == 0 then return nil end
      return x * 2
    end, range(100), 7)
    assert.equal(100, r.n)
    for i = 1, 100 do
      if i % 3 == 0 then assert.is_nil(r[i]) else assert.equal(2 * i, r[i]) end
    end
    -- holes in the input are sent as nil, items of a chunk like the others
    local input = {n = 7, 1, nil, 3, nil, nil, 6}
    r = pool:map(function(x) return x == nil and "hole" or x end, input, 3)
    assert.same({1, "hole", 3, "hole", "hole", 6, "hole", n = 7}, r)
    -- the default chunks (2e4 items in 8 chunks) and starmap's
    local xs = range(20000)
    r = pool:map(function(x) return -x end, xs)
    assert.equal(20000, r.n)
    for i = 1, 20000, 997 do assert.equal(-i, r[i]) end
    assert.equal(-20000, r[20000])
    r = pool:starmap(function(a, b) return a .. b end, {{"a", 1}, {"b", 2}, {"c", 3}}, 2)
    assert.same({"a1", "b2", "c3", n = 3}, r)
    -- a chunked imap's results, and a callback's value, are the same table
    local got = {}
    for i, v in pool:imap(function(x) return x + 1 end, range(10), 4) do got[i] = v end
    assert.same({2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, got)
    local seen
    pool:map_async(function(x) return x end, range(9), 4, function(v) seen = v end):wait()
    assert.same(range(9), {table.unpack(seen, 1, 9)})
  end)

  it("an unencodable result in a chunk names its index over the whole input", function()
    local err = err_of(pool.map, pool, function(x)
      if x == 5 then return {f = io.stdout} end
      return x
    end, range(6), 3)
    assert.equal("EncodeError", err.kind)
    assert.matches("at result%[5%]%.f", err.message)
    assert.same({1, 2, 3, 4, 5, 6, n = 6}, pool:map(function(x) return x end, range(6), 3))
  end)

  -- imap in input order: what it yields before the error, and the error
  local function imap_trail(p, f, n, opts)
    local it = p:imap(f, range(n), opts)
    local got, errs = {}, {}
    while true do
      local ok, i, v = pcall(it)
      if not ok then errs[#errs + 1] = i
      elseif i == nil then break
      else got[#got + 1] = v end
    end
    return got, errs
  end

  it("a failed chunk keeps the items before the failing one", function()
    local function f(x)
      if x == 6 then error("six") end
      return x
    end
    -- chunks {1..4} {5..8} {9, 10}: 5 finished before 6 failed; 7 and 8
    -- went with their chunk
    for _, opts in ipairs {{chunksize = 4}, {chunksize = 4, timeout = 30}} do
      local got, errs = imap_trail(pool, f, 10, opts)
      assert.same({1, 2, 3, 4, 5, 9, 10}, got)
      assert.equal(1, #errs)
      assert.matches("six", errs[1].message)
    end
    local err = err_of(pool.starmap, pool, function(a)
      if a == 6 then error("six") end
      return a
    end, {{1}, {2}, {3}, {4}, {5}, {6}, {7}}, 4)
    assert.equal("RemoteError", err.kind)
    assert.matches("six", err.message)
  end)

  it("a stack overflow in a chunk's item fails it with the items before it kept", function()
    local function f(x)
      if x == 3 then
        local function r(k) return 1 + r(k + 1) end
        return r(1)
      end
      return x
    end
    local got, errs = imap_trail(pool, f, 4, {chunksize = 4})
    assert.same({1, 2}, got)
    assert.equal(1, #errs)
    assert.equal("RemoteError", errs[1].kind)
    assert.matches("stack overflow", errs[1].message)
  end)

  it("a pool in a worker's chunk counts its own chunks' items", function()
    -- the inner workers are forked from inside the outer worker's chunk:
    -- they inherit its stack, and must not read its depth as theirs
    local r = pool:map(function(x)
      local inner <close> = mp.Pool(1)
      local got, nerr = {}, 0
      local it = inner:imap(function(y)
        if y == 3 + x then error("boom") end
        return y
      end, {1, 2, 3, 4, 5, 6, 7, 8}, {chunksize = 4})
      while true do
        local ok, i, v = pcall(it)
        if not ok then nerr = nerr + 1
        elseif i == nil then break
        else got[#got + 1] = v end
      end
      return table.concat(got, ",") .. " errors " .. nerr
    end, {1, 5}, 2)
    assert.same({"1,2,3,5,6,7,8 errors 1", "1,2,3,4,5,6,7 errors 1", n = 2}, r)
  end)
end)
