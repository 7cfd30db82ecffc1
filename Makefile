# luamp -- see README.md.  "make" builds; "make test" installs missing
# Debian packages, builds and runs the whole suite.
BUILD   ?= build
CC      ?= gcc
ifdef LUA_INCDIR
LUA_CFLAGS := -I$(LUA_INCDIR)
else
LUA_CFLAGS := $(shell pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
endif
LUA_LIBS   := $(shell pkg-config --libs lua5.4 2>/dev/null || echo -llua5.4)
VERSION := $(shell sed -n 's/^\#define LUAMP_VERSION "\(.*\)"/\1/p' runtime/luamp.h)
SONAME  := libluamp.so.$(firstword $(subst ., ,$(VERSION)))
# luamp links Lua statically and exports its API to C modules (-Wl,-E), as
# Debian's lua5.4 does: direct calls instead of PIC calls into liblua.
LUA_STATIC := $(firstword $(wildcard /usr/lib/$(shell gcc -print-multiarch 2>/dev/null)/liblua5.4.a /usr/lib/liblua5.4.a))
ifneq ($(LUA_STATIC),)
HOST_LUA := -Wl,-E $(LUA_STATIC) -ldl
else
HOST_LUA := $(LUA_LIBS)
endif
# A build dir keeps the optimisation and sanitizer flags it was first
# made with ($(BUILD)/flags.mk): a later make on it without them (make
# install run by a spec on build/san, say) builds the same kind of objects
# instead of replacing them.  Flags given on the command line win.
-include $(BUILD)/flags.mk
OPT     ?= -O2
SAN     ?=
SHELL   := /bin/bash
# "override": flags given on the command line (make CFLAGS=..., as
# LuaRocks does) come first and ours are still added.
override CFLAGS  += -std=c11 -D_GNU_SOURCE $(OPT) -g -Wall -Wextra -Werror \
           -fPIC -fvisibility=hidden $(SAN) $(LUA_CFLAGS) -Iruntime -I$(BUILD)
# -z now: symbols are bound at load, not lazily -- a forked child that
# calls a libc function for the first time would otherwise resolve it (and
# copy the GOT page) in every child.
override LDFLAGS += $(SAN) -Wl,-z,now
# hiredis: the Redis client of the broker (runtime/redis.c)
LIBS    := -lm -lhiredis

# libedit (line editing, history and completion in the REPL) when
# pkg-config finds its header; the REPL loads the library (dlopen) when it
# starts on a terminal, so scripts never map it.  Without it (or with
# LIBEDIT=no, or when the library is missing at run time) the REPL reads
# plain lines.  build/tests/luamp-noedit is always built without it, so
# the suite checks the fallback too.
LIBEDIT ?= $(shell pkg-config --exists libedit 2>/dev/null && echo yes)
ifeq ($(LIBEDIT),yes)
EDIT_CFLAGS := -DLUAMP_HAVE_LIBEDIT $(shell pkg-config --cflags libedit)
endif

# The configuration a build was made with (compiler, flags, libedit or
# not).  Every object depends on $(BUILD)/config, which is rewritten only
# when that text changes: a build dir made before libedit (or another
# dependency) was installed is rebuilt with it, not kept as it was.
# (-I$(BUILD) left out: the same dir named relative or absolute is one)
CONFIG_TEXT := $(CC) $(subst -I$(BUILD),,$(CFLAGS)) | $(EDIT_CFLAGS) | $(LDFLAGS) | $(HOST_LUA) | $(LIBS)
CONFIG  := $(BUILD)/config

HOST_SRC := runtime/luamp.c runtime/repl.c runtime/host.c
LIB_SRC  := $(filter-out $(HOST_SRC),$(wildcard runtime/*.c))
LUA_SRC  := $(sort $(wildcard lua/multiprocessing/*.lua))
LIB_OBJ  := $(LIB_SRC:runtime/%.c=$(BUILD)/obj/%.o) $(BUILD)/obj/luafiles.o
HOST_OBJ := $(HOST_SRC:runtime/%.c=$(BUILD)/obj/%.o)
NOEDIT_OBJ := $(HOST_SRC:runtime/%.c=$(BUILD)/obj/noedit-%.o)
CTEST_SRC := $(wildcard spec/c/test_*.c)
CTESTS   := $(CTEST_SRC:spec/c/%.c=$(BUILD)/tests/%)
HEADERS  := $(wildcard runtime/*.h)

# Where "make install" puts things (DESTDIR is prepended to each).  The Lua
# directories are the ones Debian's lua5.4 searches for PREFIX=/usr/local
# (and PREFIX=/usr): $(PREFIX)/lib/lua/5.4 and $(PREFIX)/share/lua/5.4.
PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
MANDIR     ?= $(PREFIX)/share/man
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
LUA_CMOD   ?= $(PREFIX)/lib/lua/5.4
LUA_LMOD   ?= $(PREFIX)/share/lua/5.4

.PHONY: all deps test check sanitize bench example soak clean install \
        uninstall rock rock-install fuzz FORCE
all: $(BUILD)/luamp $(BUILD)/multiprocessing.so $(BUILD)/libluamp.a \
     $(BUILD)/libluamp.so $(CTESTS) $(BUILD)/tests/luamp-noedit \
     $(BUILD)/examples/embed-host $(BUILD)/luamp-worker

deps:
	@scripts/deps.sh

$(CONFIG): FORCE | $(BUILD)/obj
	@test -f $(BUILD)/flags.mk || \
	  printf 'OPT ?= %s\nSAN ?= %s\n' '$(OPT)' '$(SAN)' > $(BUILD)/flags.mk
	@printf '%s\n' '$(subst ','\'',$(CONFIG_TEXT))' | cmp -s - $@ || \
	  printf '%s\n' '$(subst ','\'',$(CONFIG_TEXT))' > $@

$(BUILD)/obj/%.o: runtime/%.c $(HEADERS) $(CONFIG) | $(BUILD)/obj
	$(CC) $(CFLAGS) -c $< -o $@

$(HOST_OBJ): $(BUILD)/obj/%.o: runtime/%.c $(HEADERS) $(CONFIG) | $(BUILD)/obj
	$(CC) $(CFLAGS) $(EDIT_CFLAGS) -c $< -o $@

$(BUILD)/obj/noedit-%.o: runtime/%.c $(HEADERS) $(CONFIG) | $(BUILD)/obj
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/luafiles.c: scripts/embed.lua $(LUA_SRC) | $(BUILD)/obj
	lua5.4 scripts/embed.lua $@ $(LUA_SRC)

$(BUILD)/obj/luafiles.o: $(BUILD)/luafiles.c runtime/internal.h $(CONFIG)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libluamp.a: $(LIB_OBJ)
	rm -f $@ && ar rcs $@ $^

# The module and the shared library are the same objects; neither links
# liblua, whose symbols come from the interpreter or host that loads them.
$(BUILD)/multiprocessing.so: $(LIB_OBJ)
	$(CC) -shared $(LDFLAGS) -o $@ $^ $(LIBS)

# libluamp.so.X.Y.Z with the soname libluamp.so.X and the usual links, laid
# out in build/ as it is installed.
$(BUILD)/libluamp.so.$(VERSION): $(LIB_OBJ)
	$(CC) -shared $(LDFLAGS) -Wl,-soname,$(SONAME) -o $@ $^ $(LIBS)

$(BUILD)/libluamp.so: $(BUILD)/libluamp.so.$(VERSION)
	ln -sf libluamp.so.$(VERSION) $(BUILD)/$(SONAME)
	ln -sf $(SONAME) $@

# The embedding example, linked with the shared library in build/.
$(BUILD)/examples/embed-host: scripts/examples/embed/host.c $(BUILD)/libluamp.so runtime/luamp.h
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -o $@ $< -L$(BUILD) -lluamp -Wl,-rpath,'$$ORIGIN/..' \
	  $(LDFLAGS) $(LUA_LIBS) $(LIBS)

$(BUILD)/luamp: $(HOST_OBJ) $(BUILD)/libluamp.a
	$(CC) $(LDFLAGS) -o $@ $(HOST_OBJ) $(BUILD)/libluamp.a $(HOST_LUA) -ldl $(LIBS)

# The worker daemon of a broker (multiprocessing.broker_worker): a luamp
# script naming the luamp next to it (build/) or the installed one.
WORKER_SCRIPT = printf '\#!%s\nrequire("multiprocessing.broker_worker").main(arg)\n' '$(1)' > $(2) && chmod 755 $(2)
$(BUILD)/luamp-worker: Makefile | $(BUILD)/obj
	$(call WORKER_SCRIPT,$(abspath $(BUILD))/luamp,$@)

$(BUILD)/tests/luamp-noedit: $(NOEDIT_OBJ) $(BUILD)/libluamp.a | $(BUILD)/tests
	$(CC) $(LDFLAGS) -o $@ $(NOEDIT_OBJ) $(BUILD)/libluamp.a $(HOST_LUA) $(LIBS)

$(BUILD)/tests/%: spec/c/%.c $(BUILD)/libluamp.a $(HEADERS) $(wildcard spec/c/*.h) $(CONFIG) | $(BUILD)/tests
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libluamp.a $(LUA_LIBS) $(LIBS)

$(BUILD)/bench_probes: scripts/bench_probes.c | $(BUILD)/obj
	$(CC) -std=c11 -D_GNU_SOURCE -O2 -Wall -Wextra -Werror -o $@ $<

# The pkg-config file is written at install time, for the PREFIX of that
# install; directories under PREFIX are written relative to ${prefix}, so
# that pkg-config --define-prefix and PKG_CONFIG_SYSROOT_DIR can relocate
# a staged (DESTDIR) copy.
pc_rel = $(patsubst $(PREFIX)/%,$${prefix}/%,$(1))

INSTALLED_FILES = $(BINDIR)/luamp $(BINDIR)/luamp-worker $(LUA_CMOD)/multiprocessing.so \
  $(LUA_SRC:lua/%=$(LUA_LMOD)/%) $(LIBDIR)/libluamp.a \
  $(LIBDIR)/libluamp.so.$(VERSION) $(LIBDIR)/$(SONAME) $(LIBDIR)/libluamp.so \
  $(INCLUDEDIR)/luamp.h $(PKGCONFIGDIR)/luamp.pc $(MANDIR)/man1/luamp.1

install: $(BUILD)/luamp $(BUILD)/multiprocessing.so $(BUILD)/libluamp.a \
         $(BUILD)/libluamp.so
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LUA_CMOD) \
	  $(DESTDIR)$(LUA_LMOD)/multiprocessing $(DESTDIR)$(LIBDIR) \
	  $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(MANDIR)/man1
	install -m 755 $(BUILD)/luamp $(DESTDIR)$(BINDIR)/luamp
	$(call WORKER_SCRIPT,$(BINDIR)/luamp,$(DESTDIR)$(BINDIR)/luamp-worker)
	install -m 755 $(BUILD)/multiprocessing.so $(DESTDIR)$(LUA_CMOD)/multiprocessing.so
	install -m 644 $(LUA_SRC) $(DESTDIR)$(LUA_LMOD)/multiprocessing/
	install -m 644 $(BUILD)/libluamp.a $(DESTDIR)$(LIBDIR)/libluamp.a
	install -m 755 $(BUILD)/libluamp.so.$(VERSION) $(DESTDIR)$(LIBDIR)/
	ln -sf libluamp.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libluamp.so
	install -m 644 runtime/luamp.h $(DESTDIR)$(INCLUDEDIR)/luamp.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(call pc_rel,$(LIBDIR))|' \
	    -e 's|@INCLUDEDIR@|$(call pc_rel,$(INCLUDEDIR))|' \
	    -e 's|@VERSION@|$(VERSION)|' -e 's|@LIBS@|$(LIBS)|' \
	    runtime/luamp.pc.in > $(DESTDIR)$(PKGCONFIGDIR)/luamp.pc
	chmod 644 $(DESTDIR)$(PKGCONFIGDIR)/luamp.pc
	install -m 644 runtime/luamp.1 $(DESTDIR)$(MANDIR)/man1/luamp.1
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ] && command -v ldconfig >/dev/null; \
	then ldconfig; fi

uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED_FILES))
	-rmdir $(DESTDIR)$(LUA_LMOD)/multiprocessing 2>/dev/null

# LuaRocks' make backend (luamp-<version>-1.rockspec): the module only,
# into the rocks tree's directories.
rock: $(BUILD)/multiprocessing.so

rock-install: $(BUILD)/multiprocessing.so
	install -d $(INST_LIBDIR) $(INST_LUADIR)/multiprocessing
	install -m 755 $(BUILD)/multiprocessing.so $(INST_LIBDIR)/multiprocessing.so
	install -m 644 $(LUA_SRC) $(INST_LUADIR)/multiprocessing/

$(BUILD)/obj $(BUILD)/tests:
	mkdir -p $@

# The whole suite: specs under luamp and under stock lua5.4, C tests.
test: deps
	@$(MAKE) --no-print-directory all
	@lua5.4 scripts/run_tests.lua --build $(BUILD) $(if $(FILTER),--filter '$(FILTER)')

check: test

# The same suite built with AddressSanitizer and UndefinedBehaviorSanitizer,
# and LUAMP_DEBUG: the LUAMP_ASSERT invariant checks compiled in.
sanitize: deps
	@$(MAKE) --no-print-directory BUILD=build/san OPT=-O1 \
	  SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -DLUAMP_DEBUG" all
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  lua5.4 scripts/run_tests.lua --build build/san \
	    --preload "$$($(CC) -print-file-name=libasan.so)"
	@$(MAKE) --no-print-directory fuzz FUZZ_RUNS=-1 FUZZ_TIME=60

# The decoder under libFuzzer (clang) with ASan+UBSan: FUZZ_RUNS executions
# (10^7 by default) from the seed corpus in spec/fuzz/corpus.
FUZZ_CC   ?= clang
FUZZ_RUNS ?= 10000000
FUZZ_TIME ?= 0
FUZZ_BIN  := build/fuzz/fuzz_decode
$(FUZZ_BIN): spec/fuzz/fuzz_decode.c $(LIB_SRC) $(BUILD)/luafiles.c $(HEADERS)
	@mkdir -p build/fuzz
	$(FUZZ_CC) -g -O1 -std=c11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined \
	  -fno-sanitize-recover=all $(LUA_CFLAGS) -Iruntime -I$(BUILD) -o $@ \
	  spec/fuzz/fuzz_decode.c $(LIB_SRC) $(BUILD)/luafiles.c \
	  $(or $(LUA_STATIC),$(LUA_LIBS)) $(LIBS) -ldl

fuzz: deps $(FUZZ_BIN)
	@rm -rf build/fuzz/corpus && mkdir -p build/fuzz/corpus && cp spec/fuzz/corpus/* build/fuzz/corpus/
	@cd build/fuzz && ./fuzz_decode -runs=$(FUZZ_RUNS) -max_total_time=$(FUZZ_TIME) \
	  -print_final_stats=1 corpus 2>&1 | grep -E "^(stat::number_of_executed_units|Done|==|SUMMARY|fuzz failure)" ; \
	  test $${PIPESTATUS[0]} -eq 0 && echo "fuzz: clean"

# Long runs not in make test: spec/soak/*_soak.lua (the biggest messages;
# 10^5 broker tasks across 2 worker daemons).
soak: deps
	@$(MAKE) --no-print-directory all
	@LUAMP_BUILD=$(abspath $(BUILD)) LUAMP_BIN=$(abspath $(BUILD))/luamp \
	  $(BUILD)/luamp /usr/bin/busted --pattern=_soak spec/soak

bench: deps
	@$(MAKE) --no-print-directory all $(BUILD)/bench_probes
	@lua5.4 scripts/bench_table.lua --build $(BUILD)

example: deps
	@$(MAKE) --no-print-directory all
	@$(BUILD)/luamp scripts/examples/cpu_bound.lua

clean:
	rm -rf build
