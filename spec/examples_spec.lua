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
