#!/bin/sh
# deps.sh [--check] -- makes sure the Debian packages luamp needs are here.
# Installs what is missing with apt-get when run as root; otherwise prints
# the apt-get line to run and fails.  Each package and why:
#   gcc make pkg-config   build
#   lua5.4 liblua5.4-dev  the Lua we build against, and stock lua5.4 for tests
#   lua-cjson             JSON for the benchmark harness and examples
#   lua-busted            the spec runner
#   libssl-dev            libcrypto's HMAC for authenticated connections
#   libedit-dev           line editing and history in the REPL (BSD licence)
#   python3 python3-msgpack  CPython peers for interop tests and benchmarks
#   lua-messagepack       a second, pure-Lua MessagePack peer for interop tests
#   tmux                  drives the REPL in a terminal in the REPL specs
#   clang                 libFuzzer for make fuzz / make sanitize
#   luarocks              builds the rockspec in the packaging spec
#   groff-base            renders the man page in the packaging spec
#   binutils              nm/readelf for the exported-symbols spec
#   lua-luv lua-cqueues   event-loop interop tests
#   libhiredis-dev        hiredis, the Redis client of the broker Pool (runtime/redis.c)
#   redis-server          the broker the broker specs start for themselves
#   python3-celery python3-rq  the peers of the broker benchmark
set -eu

PKGS="gcc make pkg-config lua5.4 liblua5.4-dev lua-cjson lua-busted libssl-dev
libedit-dev python3 python3-msgpack lua-messagepack tmux clang luarocks
groff-base binutils lua-luv lua-cqueues libhiredis-dev redis-server
python3-celery python3-rq"

missing=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done
[ -z "$missing" ] && exit 0

if [ "${1:-}" = "--check" ]; then
  echo "missing Debian packages:$missing" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "luamp needs these Debian packages:$missing" >&2
  echo "install them with:  sudo apt-get install -y$missing" >&2
  exit 1
fi
echo "installing Debian packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends $missing >/dev/null 2>&1 || {
  apt-get update >/dev/null
  apt-get install -y --no-install-recommends $missing >/dev/null
}
