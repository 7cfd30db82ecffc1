# luamp -- see README.md.  "make" builds; "make test" installs missing
# Debian packages, builds and runs the whole suite.
BUILD   ?= build
CC      ?= gcc
LUA_CFLAGS := $(shell pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
LUA_LIBS   := $(shell pkg-config --libs lua5.4 2>/dev/null || echo -llua5.4)
# luamp links Lua statically and exports its API to C modules (-Wl,-E), as
# Debian's lua5.4 does: direct calls instead of PIC calls into liblua.
LUA_STATIC := $(firstword $(wildcard /usr/lib/$(shell gcc -print-multiarch 2>/dev/null)/liblua5.4.a /usr/lib/liblua5.4.a))
ifneq ($(LUA_STATIC),)
HOST_LUA := -Wl,-E $(LUA_STATIC) -ldl
else
HOST_LUA := $(LUA_LIBS)
endif
OPT     ?= -O2
SAN     ?=
SHELL   := /bin/bash
CFLAGS  += -std=c11 -D_GNU_SOURCE $(OPT) -g -Wall -Wextra -Werror -fPIC \
           -fvisibility=hidden $(SAN) $(LUA_CFLAGS) -Iruntime -I$(BUILD)
LDFLAGS += $(SAN)
LIBS    := -lm

HOST_SRC := runtime/luamp.c runtime/repl.c
LIB_SRC  := $(filter-out $(HOST_SRC),$(wildcard runtime/*.c))
LUA_SRC  := $(sort $(wildcard lua/multiprocessing/*.lua))
LIB_OBJ  := $(LIB_SRC:runtime/%.c=$(BUILD)/obj/%.o) $(BUILD)/obj/luafiles.o
HOST_OBJ := $(HOST_SRC:runtime/%.c=$(BUILD)/obj/%.o)
CTEST_SRC := $(wildcard spec/c/test_*.c)
CTESTS   := $(CTEST_SRC:spec/c/%.c=$(BUILD)/tests/%)
HEADERS  := $(wildcard runtime/*.h)

.PHONY: all deps test check sanitize bench example clean fuzz
all: $(BUILD)/luamp $(BUILD)/multiprocessing.so $(BUILD)/libluamp.a \
     $(BUILD)/libluamp.so $(CTESTS)

deps:
	@scripts/deps.sh

$(BUILD)/obj/%.o: runtime/%.c $(HEADERS) | $(BUILD)/obj
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/luafiles.c: scripts/embed.lua $(LUA_SRC) | $(BUILD)/obj
	lua5.4 scripts/embed.lua $@ $(LUA_SRC)

$(BUILD)/obj/luafiles.o: $(BUILD)/luafiles.c runtime/internal.h
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libluamp.a: $(LIB_OBJ)
	rm -f $@ && ar rcs $@ $^

# The module and the shared library are the same objects; neither links
# liblua, whose symbols come from the interpreter or host that loads them.
$(BUILD)/multiprocessing.so: $(LIB_OBJ)
	$(CC) -shared $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/libluamp.so: $(LIB_OBJ)
	$(CC) -shared $(LDFLAGS) -Wl,-soname,libluamp.so.0 -o $@ $^ $(LIBS)

$(BUILD)/luamp: $(HOST_OBJ) $(BUILD)/libluamp.a
	$(CC) $(LDFLAGS) -o $@ $(HOST_OBJ) $(BUILD)/libluamp.a $(HOST_LUA) $(LIBS)

$(BUILD)/tests/%: spec/c/%.c $(BUILD)/libluamp.a $(HEADERS) | $(BUILD)/tests
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libluamp.a $(LUA_LIBS) $(LIBS)

$(BUILD)/bench_probes: scripts/bench_probes.c | $(BUILD)/obj
	$(CC) -std=c11 -D_GNU_SOURCE -O2 -Wall -Wextra -Werror -o $@ $<

$(BUILD)/obj $(BUILD)/tests:
	mkdir -p $@

# The whole suite: specs under luamp and under stock lua5.4, C tests.
test: deps
	@$(MAKE) --no-print-directory all
	@lua5.4 scripts/run_tests.lua --build $(BUILD)

check: test

# The same suite built with AddressSanitizer and UndefinedBehaviorSanitizer.
sanitize: deps
	@$(MAKE) --no-print-directory BUILD=build/san OPT=-O1 \
	  SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" all
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
	  $(or $(LUA_STATIC),$(LUA_LIBS)) -lm -ldl

fuzz: deps $(FUZZ_BIN)
	@rm -rf build/fuzz/corpus && mkdir -p build/fuzz/corpus && cp spec/fuzz/corpus/* build/fuzz/corpus/
	@cd build/fuzz && ./fuzz_decode -runs=$(FUZZ_RUNS) -max_total_time=$(FUZZ_TIME) \
	  -print_final_stats=1 corpus 2>&1 | grep -E "^(stat::number_of_executed_units|Done|==|SUMMARY|fuzz failure)" ; \
	  test $${PIPESTATUS[0]} -eq 0 && echo "fuzz: clean"

bench: deps
	@$(MAKE) --no-print-directory all $(BUILD)/bench_probes
	@lua5.4 scripts/bench_table.lua --build $(BUILD)

example: deps
	@$(MAKE) --no-print-directory all
	@$(BUILD)/luamp scripts/examples/hello.lua

clean:
	rm -rf build
