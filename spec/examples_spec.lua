-- Every script in scripts/examples/ runs and prints what it should.
local H = require "helpers"

-- example file -> {args, check(out, err, code)}
local expected = {
  ["hello.lua"] = function(out)
    assert.matches("^luamp %d+%.%d+%.%d+: %d+ CPUs, running as MainProcess %(pid %d+%)\n$", out)
  end,
}

describe("examples", function()
  local files = {}
  for f in io.popen("ls scripts/examples/*.lua"):lines() do
    files[#files + 1] = f:match("[^/]+$")
  end

  it("all have a check here", function()
    for _, f in ipairs(files) do
      assert.is_not_nil(expected[f], "no check for scripts/examples/" .. f)
    end
  end)

  for _, f in ipairs(files) do
    if expected[f] then
      it(f .. " runs", function()
        local out, err, code = H.luamp_run("scripts/examples/" .. f)
        assert.equal(0, code, err)
        expected[f](out, err)
      end)
    end
  end
end)

-- The embedding example: a C host (built as build/examples/embed-host)
-- running a script that calls the host's own C function.
describe("examples/embed", function()
  -- FNV-1a, as host.checksum computes it in C
  local function fnv1a(s)
    local h = 2166136261
    for i = 1, #s do
      h = ((h ~ s:byte(i)) * 16777619) & 0xffffffff
    end
    return h
  end

  it("host.c runs checksums.lua with its C function and the module", function()
    local out, err, code = H.sh(H.q(H.build .. "/examples/embed-host") ..
      " scripts/examples/embed/checksums.lua alpha 'two words' ''")
    assert.equal(0, code, err)
    assert.equal("", err)
    local expect = {}
    for _, w in ipairs {"alpha", "two words", ""} do
      expect[#expect + 1] = string.format("%-8s %08x\n", w, fnv1a(w))
    end
    expect[#expect + 1] = string.format("task(%q) = %08x\n", "alpha", fnv1a("alpha"))
    assert.equal(table.concat(expect), out:match("^(.-\n)embed%-host"))
    assert.matches("\nembed%-host %d+%.%d+%.%d+: 3 words in MainProcess %(pid %d+%), " ..
                   "luamp %d+%.%d+%.%d+, %d+ CPUs\n$", out)
  end)

  it("host.c reports a script error with a traceback and status 1", function()
    local path = H.write(os.tmpname() .. ".lua",
      "local host = require 'host'\nhost.checksum({})\n")
    local out, err, code = H.sh(H.q(H.build .. "/examples/embed-host") .. " " .. H.q(path))
    os.remove(path)
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("bad argument #1 to 'checksum' %(string expected, got table%)", err)
    assert.matches("stack traceback:", err)
  end)
end)
