-- Packaging: make install / uninstall into a temporary DESTDIR or PREFIX,
-- and the installed copy used from stock lua5.4, from the installed luamp,
-- and from a C program built with pkg-config; the LuaRocks rockspec.
local H = require "helpers"

-- Under make sanitize the lua5.4 half runs with the ASan runtime in
-- LD_PRELOAD, which would make make, sed, cc and luarocks report their own
-- leaks; the interpreters under test get it back through H.lua54.
local function sh(cmd, stdin)
  return H.sh("unset LD_PRELOAD; " .. cmd, stdin)
end

local version = H.slurp("runtime/luamp.h"):match('#define LUAMP_VERSION "([^"]+)"')
local major = version:match("^(%d+)")
local version_num = H.slurp("runtime/luamp.h"):match("#define LUAMP_VERSION_NUM (%d+)")

local function tmpdir()
  return (sh("mktemp -d"):gsub("\n", ""))
end

-- Builds compile on every core (-j): the suite runs one spec at a time,
-- and this file's three full builds (rockspec, LIBEDIT=no, libedit) are
-- most of its time.
local JOBS = "-j$(nproc)"

local function make(args)
  local out, err, code = sh("make --no-print-directory " .. JOBS .. " BUILD=" .. H.q(H.build) ..
                              " " .. args)
  assert.equal(0, code, out .. err)
  return out
end

-- Files and links under dir, relative, sorted ("path" or "path -> target").
local function tree(dir)
  local out = sh("cd " .. H.q(dir) .. " && find . \\( -type f -o -type l \\) " ..
                   "-printf '%P %l\\n' | sort")
  local list = {}
  for line in out:gmatch("[^\n]+") do
    local path, target = line:match("^(%S+) ?(.*)$")
    list[#list + 1] = target ~= "" and (path .. " -> " .. target) or path
  end
  return list
end

-- Flags that a program linking the sanitizer-built library needs too.
local function san_flags()
  return H.sanitized() and "-fsanitize=address,undefined" or ""
end

local C_PROGRAM = [[
#include <stdio.h>
#include <lauxlib.h>
#include <lualib.h>
#include <luamp.h>

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luamp_preload(L);
  if (luaL_dostring(L, "local mp = require 'multiprocessing' "
                       "io.write(mp.version, ' ', mp.current_process().name, ' ')") != LUA_OK) {
    fprintf(stderr, "%s\n", lua_tostring(L, -1));
    return 1;
  }
  printf("%s %s %d\n", luamp_version(), LUAMP_VERSION, LUAMP_VERSION_NUM);
  lua_close(L);
  return 0;
}
]]

-- Compiles C_PROGRAM with the given flags; returns the binary's path.
local function compile(dir, flags)
  local src = H.write(dir .. "/prog.c", C_PROGRAM)
  local bin = dir .. "/prog"
  local out, err, code = sh("cc -std=c11 -Wall -Werror " .. san_flags() .. " -o " ..
                              H.q(bin) .. " " .. H.q(src) .. " " .. flags)
  assert.equal(0, code, out .. err)
  return bin
end

local expected_tree = {
  "usr/local/bin/luamp",
  "usr/local/bin/luamp-worker",
  "usr/local/include/luamp.h",
  "usr/local/lib/libluamp.a",
  "usr/local/lib/libluamp.so -> libluamp.so." .. major,
  "usr/local/lib/libluamp.so." .. major .. " -> libluamp.so." .. version,
  "usr/local/lib/libluamp.so." .. version,
  "usr/local/lib/lua/5.4/multiprocessing.so",
  "usr/local/lib/pkgconfig/luamp.pc",
}
for f in io.popen("ls lua/multiprocessing/*.lua"):lines() do
  expected_tree[#expected_tree + 1] = "usr/local/share/lua/5.4/multiprocessing/" ..
                                      f:match("[^/]+$")
end
expected_tree[#expected_tree + 1] = "usr/local/share/man/man1/luamp.1"
table.sort(expected_tree)

describe("make install into a DESTDIR", function()
  local dest, root
  setup(function()
    dest = tmpdir()
    root = dest .. "/usr/local"
    make("install PREFIX=/usr/local DESTDIR=" .. H.q(dest))
  end)
  teardown(function() sh("rm -rf " .. H.q(dest)) end)

  it("installs the command, module, Lua files, library, header, .pc and man page", function()
    assert.same(expected_tree, tree(dest))
    assert.equal("755", (sh("stat -c %a " .. H.q(root .. "/bin/luamp")):gsub("\n", "")))
    -- the broker's worker daemon runs the installed luamp (not the build's)
    assert.equal("755", (sh("stat -c %a " .. H.q(root .. "/bin/luamp-worker")):gsub("\n", "")))
    assert.equal("#!/usr/local/bin/luamp", H.slurp(root .. "/bin/luamp-worker"):match("^[^\n]*"))
    assert.equal("644", (sh("stat -c %a " .. H.q(root .. "/include/luamp.h")):gsub("\n", "")))
    assert.equal(H.slurp("runtime/luamp.h"), H.slurp(root .. "/include/luamp.h"))
  end)

  it("is used from stock lua5.4 through LUA_PATH and LUA_CPATH", function()
    local env = "LUA_PATH=" .. H.q(root .. "/share/lua/5.4/?.lua;" ..
                                   root .. "/share/lua/5.4/?/init.lua") ..
                " LUA_CPATH=" .. H.q(root .. "/lib/lua/5.4/?.so")
    local out, err, code = sh("cd / && " .. env .. " " .. H.lua54 .. " -e " .. H.q([[
      local mp = require "multiprocessing"
      print(mp.version, mp.cpu_count() > 0, mp.current_process().name)
      print(debug.getinfo(mp.names, "S").source)
      print(package.searchpath("multiprocessing", package.cpath))
    ]]))
    assert.equal(0, code, err)
    assert.equal(version .. "\ttrue\tMainProcess\n" ..
                 "@" .. root .. "/share/lua/5.4/multiprocessing/init.lua\n" ..
                 root .. "/lib/lua/5.4/multiprocessing.so\n", out)
  end)

  it("works from LUA_CPATH alone with the Lua files built into the module", function()
    local out, err, code = sh("cd / && LUA_PATH=/nowhere/?.lua LUA_CPATH=" ..
      H.q(root .. "/lib/lua/5.4/?.so") .. " " .. H.lua54 .. " -e " .. H.q([[
      local mp = require "multiprocessing"
      print(mp.version, debug.getinfo(mp.names, "S").source)
    ]]))
    assert.equal(0, code, err)
    assert.equal(version .. "\t@multiprocessing/init.lua\n", out)   -- embedded copy
  end)

  it("runs the installed luamp from anywhere", function()
    local out, err, code = sh("cd / && " .. H.q(root .. "/bin/luamp") ..
      " -e 'print(require(\"multiprocessing\").version)'")
    assert.equal(0, code, err)
    assert.equal(version .. "\n", out)
  end)

  it("writes the final prefix into luamp.pc, never the DESTDIR", function()
    local pcfile = H.slurp(root .. "/lib/pkgconfig/luamp.pc")
    assert.matches("\nprefix=/usr/local\n", pcfile)
    assert.matches("\nlibdir=${prefix}/lib\n", pcfile)
    assert.matches("\nincludedir=${prefix}/include\n", pcfile)
    assert.matches("\nVersion: " .. version:gsub("%p", "%%%0") .. "\n", pcfile)
    assert.matches("\nRequires: lua5.4\n", pcfile)
    local _, _, found = sh("grep -rqF " .. H.q(dest) .. " " .. H.q(dest))
    assert.equal(1, found)   -- grep found nothing
  end)

  it("builds and runs a C program from the stage with luamp.pc's variables", function()
    -- luamp's own paths through PKG_CONFIG_SYSROOT_DIR (so relative to
    -- the prefix); Lua's from the system (Requires: lua5.4), which the
    -- sysroot must not touch
    local pc = "PKG_CONFIG_PATH=" .. H.q(root .. "/lib/pkgconfig") .. " pkg-config "
    assert.equal(version .. "\n", sh(pc .. "--modversion luamp"))
    local staged = sh(pc:gsub("pkg%-config $", "PKG_CONFIG_SYSROOT_DIR=" .. H.q(dest) ..
                                " pkg-config ") .. "--cflags-only-I --libs-only-L luamp")
    assert.matches("^%-I" .. root:gsub("%p", "%%%0") .. "/include ", staged)
    assert.matches(" %-L" .. root:gsub("%p", "%%%0") .. "/lib", staged)
    local flags = "-I" .. H.q(dest .. sh(pc .. "--variable=includedir luamp"):gsub("\n", "")) ..
                  " -L" .. H.q(dest .. sh(pc .. "--variable=libdir luamp"):gsub("\n", "")) ..
                  " -lluamp $(pkg-config --cflags --libs lua5.4)"
    local dir = tmpdir()
    local bin = compile(dir, flags)
    local env = "LD_LIBRARY_PATH=" .. H.q(root .. "/lib") .. " "
    local out, err, code = sh(env .. H.q(bin))
    assert.equal(0, code, err)
    assert.equal(string.format("%s MainProcess %s %s %s\n", version, version, version,
      version_num), out)
    assert.matches("libluamp%.so%." .. major .. " => " .. root:gsub("%p", "%%%0") .. "/lib/",
                   sh(env .. "ldd " .. H.q(bin)))
    sh("rm -rf " .. H.q(dir))
  end)

  it("installs a man page that renders cleanly and names this version", function()
    local page = root .. "/share/man/man1/luamp.1"
    local _, err, code = sh("groff -man -Tutf8 -ww -z " .. H.q(page))
    assert.equal(0, code)
    assert.equal("", err)
    assert.matches('%.TH LUAMP 1 "[^"]*" "luamp ' .. version:gsub("%p", "%%%0") .. '"',
                   H.slurp(page))
  end)

  it("uninstalls everything it installed", function()
    local other = tmpdir()
    make("install PREFIX=/usr/local DESTDIR=" .. H.q(other))
    H.write(other .. "/usr/local/lib/lua/5.4/someone-else.so", "x")
    make("uninstall PREFIX=/usr/local DESTDIR=" .. H.q(other))
    assert.same({"usr/local/lib/lua/5.4/someone-else.so"}, tree(other))
    sh("rm -rf " .. H.q(other))
  end)
end)

describe("make install into a PREFIX", function()
  local base, prefix
  setup(function()
    base = tmpdir()
    prefix = base .. "/opt/luamp"
    make("install PREFIX=" .. H.q(prefix))
  end)
  teardown(function() sh("rm -rf " .. H.q(base)) end)

  local function pc()
    return "PKG_CONFIG_PATH=" .. H.q(prefix .. "/lib/pkgconfig") .. " pkg-config "
  end

  it("writes that prefix into luamp.pc", function()
    local pcfile = H.slurp(prefix .. "/lib/pkgconfig/luamp.pc")
    assert.matches("\nprefix=" .. prefix:gsub("%p", "%%%0") .. "\n", pcfile)
    assert.matches("\nlibdir=${prefix}/lib\n", pcfile)
  end)

  it("builds a C program with pkg-config --cflags --libs luamp alone", function()
    local libs = sh(pc() .. "--libs luamp")
    assert.matches("^%-L" .. prefix:gsub("%p", "%%%0") .. "/lib %-lluamp .*%-llua5%.4", libs)
    local dir = tmpdir()
    local bin = compile(dir, "$(" .. pc() .. "--cflags --libs luamp)")
    local env = "LD_LIBRARY_PATH=" .. H.q(prefix .. "/lib") .. " "
    local out, err, code = sh(env .. H.q(bin))
    assert.equal(0, code, err)
    assert.equal(string.format("%s MainProcess %s %s %s\n", version, version, version,
      version_num), out)
    sh("rm -rf " .. H.q(dir))
  end)

  it("links statically with libluamp.a and Libs.private", function()
    local private = sh(pc() .. "--static --libs-only-l luamp"):gsub("%-lluamp", "")
    local dir = tmpdir()
    local bin = compile(dir, "$(" .. pc() .. "--cflags luamp) " ..
      H.q(prefix .. "/lib/libluamp.a") .. " " .. private)
    local out, err, code = sh(H.q(bin))
    assert.equal(0, code, err)
    assert.matches("^" .. version:gsub("%p", "%%%0") .. " MainProcess ", out)
    assert.not_matches("libluamp", sh("ldd " .. H.q(bin)))
    sh("rm -rf " .. H.q(dir))
  end)

  it("uninstalls to an empty tree", function()
    make("uninstall PREFIX=" .. H.q(prefix))
    assert.same({}, tree(prefix))
  end)
end)

describe("rockspec", function()
  local rockspec = "luamp-" .. version .. "-1.rockspec"

  it("exists for this version and passes luarocks lint", function()
    assert.is_truthy(io.open(rockspec))
    local out, err, code = sh("luarocks --lua-version=5.4 lint " .. rockspec)
    assert.equal(0, code, out .. err)
  end)

  it("builds and installs the module into a rocks tree that lua5.4 uses", function()
    local tree_dir = tmpdir()
    -- (unoptimised, as the build's configuration below: the packaging,
    -- not the code, is what is checked; OPT from the environment is the
    -- Makefile's, which the rockspec's CFLAGS come before)
    local out, err, code = sh("MAKEFLAGS=" .. JOBS .. " OPT=-O0 luarocks --lua-version=5.4 --tree=" ..
                                H.q(tree_dir) .. " make " .. rockspec)
    assert.equal(0, code, out .. err)
    local env = "LUA_PATH=" .. H.q(tree_dir .. "/share/lua/5.4/?.lua;" ..
                                   tree_dir .. "/share/lua/5.4/?/init.lua") ..
                " LUA_CPATH=" .. H.q(tree_dir .. "/lib/lua/5.4/?.so")
    out, err, code = sh("cd / && " .. env .. " " .. H.lua54 .. " -e " .. H.q([[
      local mp = require "multiprocessing"
      print(mp.version, mp.current_process().name)
      print(debug.getinfo(mp.names, "S").source)
    ]]))
    assert.equal(0, code, err)
    assert.equal(version .. "\tMainProcess\n@" .. tree_dir ..
                 "/share/lua/5.4/multiprocessing/init.lua\n", out)
    sh("rm -rf " .. H.q(tree_dir))
  end)
end)

describe("the build's configuration", function()
  it("rebuilds a build dir made without libedit once libedit is used", function()
    local dir = tmpdir()
    -- (unoptimised: the configuration, not the code, is what is checked)
    local function build(args)
      local out, err, code = sh("make --no-print-directory " .. JOBS .. " OPT=-O0 BUILD=" ..
                                  H.q(dir) .. " " .. args .. " " .. H.q(dir .. "/luamp"))
      assert.equal(0, code, out .. err)
      return H.slurp(dir .. "/luamp")
    end
    -- without libedit the host never names the library it would load
    assert.is_nil(build("LIBEDIT=no"):find("libedit.so", 1, true))
    assert.equal("yes", (sh("pkg-config --exists libedit && echo yes"):gsub("\n", "")))
    assert.truthy(build(""):find("libedit.so", 1, true))
    -- and an unchanged configuration rebuilds nothing
    local out = sh("make --no-print-directory OPT=-O0 BUILD=" .. H.q(dir) .. " " ..
                     H.q(dir .. "/luamp"))
    assert.is_nil(out:find("-c runtime/", 1, true), out)
    sh("rm -rf " .. H.q(dir))
  end)
end)
