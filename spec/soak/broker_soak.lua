-- Long runs for make soak (not part of make test): issue 16's 10^5 tasks
-- across 2 worker daemons on the suite's own redis-server, each item its
-- own task -- nothing lost, nothing duplicated, nothing run twice
-- (spec/redis_server.lua's Server:bulk; make test runs 10^4 of them in
-- broker_faults_spec).
local R = require "redis_server"

describe("broker soak", function()
  it("loses, duplicates and re-runs nothing of 10^5 tasks across 2 daemons", function()
    local s = R.start()
    local ok, err = pcall(function()
      local secs = s:bulk("soak", 100000)
      io.stderr:write(string.format("[10^5 broker tasks across 2 daemons: %.1f s]\n", secs))
    end)
    s:stop()
    assert(ok, err)
  end)
end)
