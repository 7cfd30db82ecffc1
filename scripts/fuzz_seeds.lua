-- fuzz_seeds.lua DIR: writes the decoder fuzzer's seed corpus (one message
-- per file) -- every format family and luamp's exts.
local mp = require "multiprocessing"
local dir = assert(arg[1])
local t = {x = 1}
t.self = t
local shared = {1, 2}
local seeds = {
  nil_ = mp.encode(nil), bools = mp.encode({true, false}),
  ints = mp.encode({0, 127, 128, 255, 256, 65535, 65536, 2^32 // 1, -1, -33,
                    -129, -32769, -2^31 // 1, math.mininteger, math.maxinteger}),
  floats = mp.encode({1.5, -0.0, 1 / 0, 0 / 0}),
  strs = mp.encode({"", "abc", ("x"):rep(40), ("y"):rep(300), "\xff\x00"}),
  map = mp.encode({a = 1, [2] = "b", [1.5] = {c = {}}}),
  nested = mp.encode({{{{{1}}}}, {k = {1, 2, {3}}}}),
  cycle = mp.encode(t), shared = mp.encode({shared, shared}),
  ext = mp.encode({mp.Ext(5, "abc"), mp.Ext(-1, "\0\0\0\1")}),
  err = mp.encode(mp.new_error("ValueError", "x")),
  f32 = "\xca\x3f\xc0\x00\x00", u64 = "\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
}
for name, s in pairs(seeds) do
  local f = assert(io.open(dir .. "/" .. name, "wb"))
  f:write(s)
  f:close()
end
