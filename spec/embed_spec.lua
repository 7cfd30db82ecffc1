-- The embedding interface: what libluamp exports, how it is linked, and
-- the example host (scripts/examples/embed/host.c, checked in
-- examples_spec.lua).
local H = require "helpers"

-- Names declared LUAMP_API in the public header.
local function public_api()
  local names = {}
  local src = H.slurp("runtime/luamp.h")
  for decl in src:gmatch("\nLUAMP_API%s+([^;]-)%(") do
    names[#names + 1] = decl:match("([%w_]+)%s*$")
  end
  table.sort(names)
  return names
end

-- Defined global symbols from an nm command line.  Names beginning with
-- '_' are the toolchain's (sanitizer and linker symbols); ours never do.
local function symbols(cmd)
  local out, err, code = H.sh(cmd)
  assert.equal(0, code, err)
  local names, seen = {}, {}
  for line in out:gmatch("[^\n]+") do
    local kind, name = line:match("^%x*%s+(%u)%s+(%S+)$")
    if kind and kind ~= "U" and kind ~= "W" and kind ~= "V" and
       not name:match("^_") and not seen[name] then
      seen[name] = true
      names[#names + 1] = name
    end
  end
  table.sort(names)
  return names
end

describe("libluamp", function()
  it("declares its API in luamp.h", function()
    local api = public_api()
    for _, f in ipairs {"luaopen_multiprocessing", "luaopen_multiprocessing_core",
                        "luamp_preload", "luamp_version"} do
      local found = false
      for _, n in ipairs(api) do found = found or n == f end
      assert.is_true(found, f)
    end
  end)

  it("exports exactly the functions of luamp.h from the shared objects", function()
    local api = public_api()
    for _, so in ipairs {"libluamp.so", "multiprocessing.so"} do
      assert.same(api, symbols("nm -D --defined-only " .. H.q(H.build .. "/" .. so)))
    end
  end)

  it("has only luamp_ and luaopen_ global symbols in the static archive", function()
    local names = symbols("nm -g --defined-only " .. H.q(H.build .. "/libluamp.a"))
    assert.is_true(#names > 0)
    for _, n in ipairs(names) do
      assert.is_truthy(n:match("^luamp_") or n:match("^luaopen_"), n)
    end
  end)

  it("is versioned: soname libluamp.so.MAJOR and LUAMP_VERSION agree", function()
    local h = H.slurp("runtime/luamp.h")
    local major, minor, patch = h:match(
      "LUAMP_VERSION_MAJOR (%d+).-LUAMP_VERSION_MINOR (%d+).-LUAMP_VERSION_PATCH (%d+)")
    assert.is_truthy(major)
    assert.matches('#define LUAMP_VERSION "' .. major .. "%." .. minor .. "%." .. patch .. '"', h)
    assert.matches("#define LUAMP_VERSION_NUM " ..
      math.tointeger(major * 10000 + minor * 100 + patch) .. "\n", h)
    local dyn = H.sh("readelf -d " .. H.q(H.build .. "/libluamp.so"))
    assert.matches("%(SONAME%)%s+Library soname: %[libluamp%.so%." .. major .. "%]", dyn)
    -- liblua comes from the host or interpreter, never from the library
    assert.matches("NEEDED", dyn)
    assert.not_matches("NEEDED[^\n]*liblua[%d.-]", dyn)
    assert.not_matches("NEEDED[^\n]*liblua[%d.-]",
                       H.sh("readelf -d " .. H.q(H.build .. "/multiprocessing.so")))
  end)
end)
