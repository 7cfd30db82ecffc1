/*
 * fuzz_decode.c -- libFuzzer harness for the codec's decoder (make fuzz).
 *
 * Every input goes through the public default, mp.decode(s): untrusted (no
 * functions, names, globals, handles or proxies; bytecode, which Lua does
 * not verify, is only loaded by a trusted decode).  The decoder
 * must either raise DecodeError or return a value; a value is then encoded
 * and decoded again and must come back structurally the same.  Anything
 * else -- a crash, a sanitizer report, another kind of error, a mismatch --
 * aborts.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lualib.h>

#include "luamp.h"

static lua_State *L;

/* check(s): decode, re-encode, decode, compare; raises on a mismatch. */
static const char *const checker =
  "local mp = require 'multiprocessing'\n"
  "local _ = mp.managers   -- (its proxy class registered: refused here)\n"
  "local function same(a, b, seen)\n"
  "  if type(a) ~= type(b) then return false end\n"
  "  if type(a) == 'number' then\n"
  "    if a ~= a then return b ~= b end\n"
  "    return a == b and math.type(a) == math.type(b)\n"
  "  end\n"
  "  if type(a) ~= 'table' then return a == b end\n"
  "  if seen[a] then return seen[a] == b end\n"
  "  seen[a] = b\n"
  "  for k, v in pairs(a) do\n"
  "    if type(k) ~= 'table' and not same(v, rawget(b, k), seen) then return false end\n"
  "  end\n"
  "  return getmetatable(a) == getmetatable(b)\n"
  "end\n"
  "return function(s)\n"
  "  local ok, v = pcall(mp.decode, s)\n"
  "  if not ok then\n"
  "    if not mp.is_error(v, 'DecodeError') then error('not a DecodeError: ' .. tostring(v)) end\n"
  "    return\n"
  "  end\n"
  "  local ok2, s2 = pcall(mp.encode, v)\n"
  "  if not ok2 then\n"
  "    -- only a value too deep to encode again may fail\n"
  "    if not (mp.is_error(s2, 'EncodeError') and s2.message:find('nesting')) then\n"
  "      error('re-encode failed: ' .. tostring(s2))\n"
  "    end\n"
  "    return\n"
  "  end\n"
  "  local v2 = mp.decode(s2)\n"
  "  if not same(v, v2, {}) then\n"
  "    -- (kept for a look: the re-encoding, and the same value encoded\n"
  "    -- once more, since a failure may depend on the state's history)\n"
  "    local f = io.open('mismatch-reencoded.bin', 'wb') f:write(s2) f:close()\n"
  "    f = io.open('mismatch-again.bin', 'wb') f:write(mp.encode(v)) f:close()\n"
  "    error('round trip changed the value')\n"
  "  end\n"
  "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int runs;
  if (L == NULL) {
    L = luaL_newstate();
    luaL_openlibs(L);
    luamp_preload(L);
    if (luaL_dostring(L, checker) != LUA_OK) {
      fprintf(stderr, "harness: %s\n", lua_tostring(L, -1));
      abort();
    }
    lua_setglobal(L, "check");
  }
  lua_getglobal(L, "check");
  lua_pushlstring(L, (const char *)data, size);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    fprintf(stderr, "fuzz failure: %s\n", lua_tostring(L, -1));
    abort();
  }
  if (++runs % 4096 == 0) lua_gc(L, LUA_GCCOLLECT);
  return 0;
}
