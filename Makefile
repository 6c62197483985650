# lemsg: build, test (host and cross targets under qemu-user), size, install.
# `make help` lists the targets. Every output goes under build/.
#
# One make run works for one TARGET, whose toolchain comes from
# toolchains/$(TARGET).mk. `make test`, `check` and `size` without TARGET run
# one sub-make per target; with TARGET=<name> they do that target only. A
# target has several configurations, each in its own build/<config>/:
#
#   <target>          the tests, $(TEST_OPT) (-O1)
#   <target>-tiny     the same with TINY_FLAGS: every full-table path runs
#                     (`make test`: host; `make check`: every target but the
#                     musl ones)
#   host-asan         ASan+UBSan with g++; clang-asan with clang++    (check)
#   host-tsan         TSan with g++, only the test cases named *thread*  (check)
#                     (not clang++: its static TSan runtime defines operator
#                     new, which tests/faults.cpp replaces, and the link fails)
#
# The target clang is the host again with clang++. Every configuration's
# lemsg-tests also replays the fuzz corpus (tests/fuzz/corpus/) through the
# fuzz targets; `make fuzz` runs the targets themselves with libFuzzer
# (clang++, host only).
#
# `make test` and `check` first build every configuration (with -j<cores>
# unless you give -j), then run all of them at once: the tests mostly wait on
# sockets and timers, so their runs overlap well, and a run that waits does
# not hold up a compiler.

TARGETS := host clang armhf aarch64 armel mips musl musl-aarch64 musl-armhf
# What `make test` runs without TARGET; `make check` runs every target.
TEST_TARGETS := host clang armhf aarch64 armel mips
# Targets whose tiny configuration `make test` runs too (check runs them all,
# but the musl ones': they are there for the C library, not capacities).
TEST_TINY_TARGETS := host

# TARGET given (command line or environment) narrows test/check/size.
ifeq ($(filter command line environment override,$(origin TARGET)),)
SUITE_TARGETS.test := $(TEST_TARGETS)
SUITE_TARGETS.check := $(TARGETS)
SUITE_TARGETS.size := $(filter-out clang musl%,$(TARGETS))
else
SUITE_TARGETS.test := $(TARGET)
SUITE_TARGETS.check := $(TARGET)
SUITE_TARGETS.size := $(TARGET)
endif
TARGET ?= host
ifeq ($(filter $(TARGET),$(TARGETS)),)
$(error TARGET=$(TARGET) is not one of: $(TARGETS))
endif
include toolchains/$(TARGET).mk

# -- knobs ---------------------------------------------------------------------

# Capacities for the tiny test binary: small enough that tests fill every table.
TINY_FLAGS := -DLEMSG_TINY=1 -DLEMSG_MAX_WATCHES=6 -DLEMSG_MAX_TIMERS=3 \
              -DLEMSG_MAX_POSTED=2 -DLEMSG_MAX_SESSIONS=4 -DLEMSG_MAX_PENDING=4 \
              -DLEMSG_MAX_OUTGOING=2 -DLEMSG_MAX_DEFERRED=2 -DLEMSG_MAX_SERVICES=4 \
              -DLEMSG_MAX_TRACKED=2 -DLEMSG_TXN_BITS=6 -DLEMSG_MAX_HANDSHAKES=2 \
              -DLEMSG_HANDLE_GENERATIONS=7 -DLEMSG_DIR_MAX_SERVICES=2 -DLEMSG_DIR_MAX_WAITING=2 \
              -DLEMSG_DIR_MAX_CONNECTIONS=2 -DLEMSG_DIR_MAX_BINDINGS=4

CLANG_CXX ?= clang++
# -O1 and no -g by default: -O2 costs 40 % more compile time and -g a third
# more, and make test must stay quick on two cores. To debug a failure,
# build with TEST_OPT='-O0 -g'; `make bench` and `make size` build at -O2 and
# -Os, and CI's fuzzing and sanitizer builds at -O1.
TEST_OPT ?= -O1
# The programs (examples, lemsg-dir, lemsg, bench) are built as users build.
PROGRAM_OPT ?= -O2
# 1: each configuration compiles all of tests/*.cpp as one translation unit
# (and tests/fuzz/*.cpp as another), which halves the compile time of a
# configuration; 0: one object per file, quicker to rebuild after editing one.
UNITY ?= 1
# Jobs for `make test` and `check` when the command line gives no -j.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
SAN_OPT ?= -O1 -g
ASAN_FLAGS ?= -fsanitize=address,undefined -fno-sanitize-recover=all \
              -fno-omit-frame-pointer
TSAN_FLAGS ?= -fsanitize=thread
SIZE_OPT ?= -Os -ffunction-sections -fdata-sections
SIZE_LDFLAGS ?= -Wl,--gc-sections
# Arguments given to every test binary (add a filter: TEST_ARGS='-tc=*loop*').
TEST_ARGS ?= --no-colors=true
TEST_TIMEOUT ?= 600
SANITIZER_ENV ?= ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1
# Run first by test, check and demo with the names of the targets (and
# "packaging" for check): it checks for their tools and installs what is
# missing. `make test INSTALL_DEPS=:` skips it.
INSTALL_DEPS ?= bash toolchains/install-deps.sh

PREFIX ?= /usr/local
DESTDIR ?=
PKGCONFIGDIR ?= $(PREFIX)/share/pkgconfig

# User additions, as usual: CPPFLAGS, CXXFLAGS, LDFLAGS, LDLIBS.
WARNFLAGS := -Wall -Wextra -Wpedantic -Werror $(WARNFLAGS_TARGET)
LANGFLAGS := -std=c++17 -fno-exceptions -fno-rtti
BASEFLAGS = $(LANGFLAGS) $(WARNFLAGS) $(ARCHFLAGS) -pthread -I. $(CPPFLAGS) $(CXXFLAGS)
BASELDFLAGS = $(ARCHFLAGS) -pthread $(LDFLAGS_TARGET) $(LDFLAGS)
BASELDLIBS = $(LDLIBS) $(LDLIBS_TARGET)
# tests/main.cpp defines it empty: the same (empty) definition is no clash.
# _FILE_OFFSET_BITS=64: a 32-bit readdir() under qemu-user on a 64-bit kernel
# fails on 64-bit directory offsets, and the tests read /proc/self/fd.
# LEMSG_TEST_SOURCE_DIR: this tree, for tests that read its files (qemu-user
# sees the host's paths).
TEST_CPPFLAGS := -DDOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS= -D_FILE_OFFSET_BITS=64 \
                 -DLEMSG_TEST_SOURCE_DIR='"$(CURDIR)"'
# The zero-heap test (tests/faults.cpp) counts malloc, calloc and realloc
# through these wrappers.
TEST_LDFLAGS := -Wl,--wrap=malloc -Wl,--wrap=calloc -Wl,--wrap=realloc

# -- sources -------------------------------------------------------------------

TEST_SRCS := $(sort $(filter-out tests/alone.cpp tests/bench% tests/size_%, \
                                 $(wildcard tests/*.cpp)))
# The fuzz targets and tests/fuzz/replay.cpp, built into lemsg-tests with
# their entry points renamed (LEMSG_FUZZ_REPLAY); the corpus is read at run
# time from LEMSG_FUZZ_CORPUS, an absolute path (qemu-user sees the host's).
FUZZ_NAMES := wire service session typed directory
FUZZ_SRCS := $(sort $(wildcard tests/fuzz/*.cpp))
FUZZ_CORPUS := tests/fuzz/corpus
FUZZ_REPLAY_FLAGS = -DLEMSG_FUZZ_REPLAY -DLEMSG_FUZZ_CORPUS='"$(CURDIR)/$(FUZZ_CORPUS)"'
SIZE_SRCS := $(sort $(filter-out tests/size_empty.cpp tests/size_objects.cpp,$(wildcard tests/size_*.cpp)))
# examples/<name>.cpp is one program; examples/<name>/*.cpp are the programs
# of one example (build/<target>/examples/<name>/<program>).
EXAMPLE_SRCS := $(sort $(wildcard examples/*.cpp examples/*/*.cpp))

# -- configurations ------------------------------------------------------------

# The objects of a configuration's lemsg-tests: with UNITY=1 the doctest main,
# the README's tests, every other tests/*.cpp in one object and the fuzz
# targets in another.
# Apart: tests/readme.cpp includes examples/modem/modem_api.hpp (a #pragma
# once header) into a namespace of its own, as tests/examples.cpp does into
# another; tests/faults.cpp replaces operator new and delete, and g++ would
# see its inlined delete meet other files' new (-Wmismatched-new-delete).
UNITY_APART := tests/main.cpp tests/readme.cpp tests/faults.cpp
test_objs = $(if $(filter 1,$(UNITY)),$(addprefix build/$(1)/,main.o readme.o faults.o unity-tests.o unity-fuzz.o),\
              $(patsubst tests/%.cpp,build/$(1)/%.o,$(TEST_SRCS) $(FUZZ_SRCS)))

# $(call test_configs,<target>) and $(call check_configs,<target>)
test_configs = $(1) $(if $(filter $(TEST_TINY_TARGETS),$(1)),$(1)-tiny)
check_configs = $(1) $(if $(filter-out musl%,$(1)),$(1)-tiny) $(if $(filter host clang,$(1)),$(1)-asan) \
                $(if $(filter host,$(1)),host-tsan)
suite_configs = $(foreach t,$(SUITE_TARGETS.$(1)),$(call $(1)_configs,$(t)))

# Per configuration: compiler, flags for compiling and linking, run arguments.
cxx.$(TARGET) = $(CXX)
flags.$(TARGET) = $(TEST_OPT)
cxx.$(TARGET)-tiny = $(CXX)
flags.$(TARGET)-tiny = $(TEST_OPT) $(TINY_FLAGS)
cxx.$(TARGET)-asan = $(CXX)
flags.$(TARGET)-asan = $(SAN_OPT) $(ASAN_FLAGS)
ifeq ($(TARGET),host)
cxx.host-tsan = $(CXX)
flags.host-tsan = $(SAN_OPT) $(TSAN_FLAGS)
args.host-tsan = '--test-case=*thread*'
endif
CONFIGS := $(call check_configs,$(TARGET))

ifeq ($(V),1)
Q :=
say = @:
else
Q := @
say = @printf '  %-5s %s\n'
endif

MAKEFLAGS += --no-builtin-rules
.DELETE_ON_ERROR:
.SUFFIXES:

# -- top-level targets ---------------------------------------------------------

.DEFAULT_GOAL := all
.PHONY: all build-tests build-examples examples test check size install clean help fuzz FORCE

all: build-tests build-examples

# The test binaries and alone.o of every configuration `make test` runs.
build-tests: $(foreach c,$(call test_configs,$(TARGET)),build/$(c)/lemsg-tests \
               $(if $(wildcard tests/alone.cpp),build/$(c)/alone.o))

help:
	@echo 'make [TARGET=host|clang|armhf|aarch64|armel|mips|musl|musl-aarch64|musl-armhf] <target>'
	@echo '  all       host test binaries (normal and tiny) and examples'
	@echo '  test      install what the targets need, build every configuration, run them'
	@echo '            all and print a summary and the time taken: host (g++) and clang,'
	@echo '            armhf, aarch64, armel and mips under qemu-user, host also tiny;'
	@echo '            TARGET=<name> narrows to one target; -j<cores> unless you give -j'
	@echo '  check     test for every target (with musl: x86_64, aarch64, armhf), every'
	@echo '            tiny build, host ASan+UBSan (g++, clang++), TSan (*thread*) and'
	@echo '            the consumer tests; what CI runs'
	@echo '  run-<config>  build and run one configuration (run-host, run-armhf-tiny...)'
	@echo '  consumer  a C++20 program using lemsg built with CMake (add_subdirectory and'
	@echo '            for the host and each toolchain file, find_package for the host'
	@echo '            and armhf; cross ones under qemu) and with pkg-config'
	@echo '  size      code size of tests/size_*.cpp over tests/size_empty.cpp, -Os'
	@echo '  demo      build and run examples/demo.cpp on TARGET (host by default)'
	@echo '  fuzz      run each tests/fuzz/ target with libFuzzer for FUZZ_SECONDS (48);'
	@echo '            FUZZ_MERGE=1 merges new inputs into tests/fuzz/corpus/'
	@echo '  bench     raw-socket baseline and lemsg figures and ratios on TARGET'
	@echo '  examples  build examples/*.cpp and examples/*/*.cpp for TARGET into'
	@echo '            build/$$TARGET/examples/, then run each client/server pair of'
	@echo '            EXAMPLE_PAIRS (under qemu-user on ARM); build-examples only builds'
	@echo '  demo-directory  examples/directory: lemsg-dir, a server and a client as two users'
	@echo '  install   lemsg.hpp, lemsg.pc and the lemsg-dir and lemsg programs (for TARGET)'
	@echo '            into $$DESTDIR$$PREFIX (/usr/local)'
	@echo '  clean     remove build/'
	@echo 'Variables: TARGET, CXX, CLANG_CXX, TEST_OPT (-O1), UNITY (1), JOBS, TINY_FLAGS,'
	@echo '  TEST_ARGS, CPPFLAGS, CXXFLAGS, LDFLAGS, LDLIBS, PREFIX, DESTDIR,'
	@echo '  INSTALL_DEPS=: (skip the check for tools), V=1,'
	@echo '  FUZZ_SECONDS, FUZZ_MERGE, FUZZ_NAMES, FUZZ_ARGS'

clean:
	rm -rf build

# test and check: build every configuration (a failure in one does not stop
# the others: sub-makes run with -k), then run them all at once (check runs
# the CMake and pkg-config consumer tests beside them), then print one
# summary line each, the total and the time taken. Each run's output is in
# build/<config>/test.log; build/<config>/run.sh runs it again.
# $(call deps_names,<goal>): what install-deps.sh must check for the goal.
deps_names = $(SUITE_TARGETS.$(1)) $(if $(filter check,$(1)),packaging)
test check:
	$(Q)start=$$(date +%s); \
	  $(INSTALL_DEPS) $(call deps_names,$@) || exit 1; \
	  rm -f $(foreach c,$(call suite_configs,$@),build/$(c)/test.log build/$(c)/test.status build/$(c)/run.sh); \
	  j=$$(case ' $(MAKEFLAGS)' in *' -j'*) ;; *) echo -j$(JOBS) ;; esac); \
	  rc=0; $(MAKE) $$j -k --no-print-directory \
	    $(addprefix suite-$@-,$(SUITE_TARGETS.$@)) || rc=$$?; \
	  echo "  RUN   $(call suite_configs,$@)$(if $(filter check,$@), consumer)"; \
	  for c in $(call suite_configs,$@); do \
	    [ -f build/$$c/run.sh ] && sh build/$$c/run.sh & \
	  done; \
	  $(if $(filter check,$@),rm -f build/consumer.status; \
	    { $(MAKE) --no-print-directory consumer INSTALL_DEPS=: > build/consumer.out 2>&1; \
	      echo $$? > build/consumer.status; } &) \
	  wait; \
	  t=$$(( $$(date +%s) - start )); \
	  $(if $(filter check,$@),cat build/consumer.out; \
	    [ "$$(cat build/consumer.status 2>/dev/null)" = 0 ] || rc=1;) \
	  $(call summary_sh,$(call suite_configs,$@),$@ took $$((t / 60)) min $$((t % 60)) s)

# One sub-make per target, which builds its configurations and writes each
# one's run.sh.
$(foreach t,$(TARGETS),suite-test-$(t) suite-check-$(t)): suite-%:
	$(Q)$(MAKE) --no-print-directory TARGET=$(patsubst test-%,%,$(patsubst check-%,%,$*)) \
	    build-$(firstword $(subst -, ,$*))
build-test: $(addprefix build/,$(addsuffix /run.sh,$(call test_configs,$(TARGET))))
build-check: $(addprefix build/,$(addsuffix /run.sh,$(call check_configs,$(TARGET))))
.PHONY: build-test build-check $(foreach t,$(TARGETS),suite-test-$(t) suite-check-$(t))

# Prints the log of every failed configuration, then one line per
# configuration, then "test: <P> passed, <F> failed" where P and F count
# test cases. A configuration that was not built, crashed or whose binary
# exited non-zero with no failed test case (a sanitizer report, a timeout)
# counts as one failed test case. Exits non-zero on any failure; $$rc is the
# exit status of the sub-make.
define summary_sh
p=0; f=0; lines=''; \
for c in $(1); do \
  log=build/$$c/test.log; \
  if [ ! -f build/$$c/test.status ]; then \
    lines="$$lines$$c: not built or not run (see the errors above)|"; f=$$((f+1)); continue; \
  fi; \
  st=$$(cat build/$$c/test.status); \
  tc=$$(sed -n 's/^\[doctest\] test cases: *\([0-9]*\) *| *\([0-9]*\) passed *| *\([0-9]*\) failed.*/\2 \3/p' $$log | tail -n 1); \
  as=$$(sed -n 's/^\[doctest\] assertions: *\([0-9]*\) *|.*/\1/p' $$log | tail -n 1); \
  if [ -z "$$tc" ]; then \
    why="exit status $$st"; [ "$$st" = 124 ] && why="timed out after $(TEST_TIMEOUT) s"; \
    lines="$$lines$$c: crashed, no doctest summary ($$why; see $$log)|"; f=$$((f+1)); \
    $(call show_log_sh); continue; \
  fi; \
  set -- $$tc; p=$$((p+$$1)); f=$$(($$f+$$2)); \
  line="$$c: $$(($$1+$$2)) test cases, $$as assertions, $$2 failed"; \
  if [ "$$st" = 124 ]; then \
    line="$$line, timed out after $(TEST_TIMEOUT) s"; \
  elif [ "$$st" != 0 ] && [ "$$2" = 0 ]; then \
    line="$$line, but exit status $$st (see $$log)"; \
  fi; \
  [ "$$st" != 0 ] && [ "$$2" = 0 ] && f=$$((f+1)); \
  if [ "$$st" != 0 ]; then $(call show_log_sh); fi; \
  lines="$$lines$$line|"; \
done; \
printf '%s' "$$lines" | tr '|' '\n'; \
echo "test: $$p passed, $$f failed$(if $(2), ($(2)))"; \
[ "$$f" = 0 ] && [ "$$rc" = 0 ]
endef

# Shows $$log of configuration $$c: all of it, or its start and end if long.
show_log_sh = echo "--- $$c: $$log"; n=$$(wc -l < $$log); \
  if [ "$$n" -le 200 ]; then cat $$log; else \
    head -n 120 $$log; echo "[... $$((n-180)) lines ...]"; tail -n 60 $$log; fi; \
  echo "--- $$c: end of $$log"

# -- per-configuration rules ---------------------------------------------------

# $(call config_rules,<config>)
define config_rules
build/$(1)/%.o: tests/%.cpp build/$(1)/flags
	$$(say) CXX $$@
	@mkdir -p $$(@D)
	$(Q)$$(cxx.$(1)) $$(BASEFLAGS) $$(TEST_CPPFLAGS) $$(flags.$(1)) -MMD -MP -c $$< -o $$@

# tests/fuzz/*.cpp: this rule's stem is shorter, so it wins over the one above.
build/$(1)/fuzz/%.o: tests/fuzz/%.cpp build/$(1)/flags
	$$(say) CXX $$@
	@mkdir -p $$(@D)
	$(Q)$$(cxx.$(1)) $$(BASEFLAGS) $$(TEST_CPPFLAGS) $$(FUZZ_REPLAY_FLAGS) $$(flags.$(1)) -MMD -MP -c $$< -o $$@

build/$(1)/unity-tests.o: build/$(1)/unity-tests.cpp build/$(1)/flags
	$$(say) CXX $$@
	@mkdir -p $$(@D)
	$(Q)$$(cxx.$(1)) $$(BASEFLAGS) $$(TEST_CPPFLAGS) $$(flags.$(1)) -MMD -MP -c $$< -o $$@

build/$(1)/unity-fuzz.o: build/$(1)/unity-fuzz.cpp build/$(1)/flags
	$$(say) CXX $$@
	@mkdir -p $$(@D)
	$(Q)$$(cxx.$(1)) $$(BASEFLAGS) $$(TEST_CPPFLAGS) $$(FUZZ_REPLAY_FLAGS) $$(flags.$(1)) -MMD -MP -c $$< -o $$@

build/$(1)/lemsg-tests: $(call test_objs,$(1)) build/$(1)/readme_example.o build/$(1)/readme_typed.o build/$(1)/flags
	$$(say) LINK $$@
	$(Q)$$(cxx.$(1)) $$(flags.$(1)) $$(BASELDFLAGS) $$(TEST_LDFLAGS) -o $$@ $$(filter %.o,$$^) $$(BASELDLIBS)

# The README's quick start, as a function tests/readme.cpp runs.
build/$(1)/readme_example.o: build/$(1)/readme_example.cpp build/$(1)/flags
	$$(say) CXX $$@
	@mkdir -p $$(@D)
	$(Q)$$(cxx.$(1)) $$(BASEFLAGS) $$(TEST_CPPFLAGS) $$(flags.$(1)) -Dmain=lemsg_readme_main -MMD -MP -c $$< -o $$@

# The README's copy of examples/modem/modem_api.hpp, which tests/readme.cpp
# compiles beside the file and checks for the same protocol hash.
# The README's example bindings file, as a string tests/readme.cpp parses.
build/$(1)/readme.o: build/$(1)/readme_modem_api.hpp build/$(1)/readme_bindings.inc
build/$(1)/readme.o: CPPFLAGS += -Ibuild/$(1)

# The README's typed quick start, likewise.
build/$(1)/readme_typed.o: build/$(1)/readme_typed.cpp build/$(1)/flags
	$$(say) CXX $$@
	@mkdir -p $$(@D)
	$(Q)$$(cxx.$(1)) $$(BASEFLAGS) $$(TEST_CPPFLAGS) $$(flags.$(1)) -Dmain=lemsg_readme_typed_main -MMD -MP -c $$< -o $$@

# The flags a configuration was built with: objects rebuild when they change.
build/$(1)/flags: FORCE
	@mkdir -p $$(@D)
	@printf '%s\n' '$$(subst ','\'',$$(cxx.$(1)) $$(BASEFLAGS) $$(TEST_CPPFLAGS) $$(flags.$(1)) $$(BASELDFLAGS) $$(TEST_LDFLAGS) $$(BASELDLIBS))' > $$@.new
	@if cmp -s $$@.new $$@; then rm -f $$@.new; else mv -f $$@.new $$@; fi

# tests/alone.cpp includes only lemsg.hpp: that it compiles, with the
# warnings strict firmware builds add, is the test.
build/$(1)/alone.o: WARNFLAGS += -Wshadow -Wconversion -Wsign-conversion -Wold-style-cast

# The command that runs this configuration's tests, written once it is built
# (make test runs every configuration's at once). The result goes to
# test.log and test.status, read by the summary, so a failing run does not
# stop make. The tests get a private runtime directory, so configurations
# running at the same time cannot meet in /run/lemsg.
build/$(1)/run.sh: build/$(1)/lemsg-tests $(if $(wildcard tests/alone.cpp),build/$(1)/alone.o) FORCE
	@printf '%s\n' '#!/bin/sh' '# Runs the tests of build/$(1) (written by make; TEST_ARGS=$$(subst ','\'',$$(TEST_ARGS)))' \
	  'cd "$$(CURDIR)" || exit 1' \
	  'rm -f build/$(1)/test.status' \
	  'd=$$$$(mktemp -d "$$$${TMPDIR:-/tmp}/lemsg-$(1).XXXXXX") || exit 1' \
	  '$$(subst ','\'',LEMSG_RUNTIME_DIR=$$$$d $$(SANITIZER_ENV) timeout -k 10 $$(TEST_TIMEOUT) $$(EXEC) ./build/$(1)/lemsg-tests $$(TEST_ARGS) $$(args.$(1))) > build/$(1)/test.log 2>&1' \
	  'st=$$$$?; rm -rf "$$$$d"; echo $$$$st > build/$(1)/test.status; exit $$$$st' > $$@

# make run-<config>: build and run one configuration.
run-$(1): build/$(1)/run.sh
	$$(say) RUN $(1)
	$(Q)rc=0; sh $$<; $$(call summary_sh,$(1))
.PHONY: run-$(1)

-include $(wildcard build/$(1)/*.d build/$(1)/fuzz/*.d)
endef
$(foreach c,$(CONFIGS),$(eval $(call config_rules,$(c))))

# The unity sources: each names the files it compiles, and changes only when
# that list does. The fuzz targets are built as programs of their own too,
# so each is wrapped in a namespace; the headers they include come first, so
# that their own includes inside the namespace are no-ops.
build/%/unity-tests.cpp: FORCE
	@mkdir -p $(@D)
	@{ echo '// Generated by the Makefile: every test file in one translation unit.'; \
	   for f in $(filter-out $(UNITY_APART),$(TEST_SRCS)); do echo "#include \"$$f\""; done; } > $@.new
	@if cmp -s $@.new $@; then rm -f $@.new; else mv -f $@.new $@; fi
build/%/unity-fuzz.cpp: FORCE
	@mkdir -p $(@D)
	@{ echo '// Generated by the Makefile: the fuzz targets and their replay in one translation unit.'; \
	   echo '#include "tests/fuzz/fuzz.hpp"'; grep -h '^#include <' $(FUZZ_SRCS) | sort -u; \
	   for f in $(FUZZ_SRCS); do n=$${f##*/}; \
	     echo "namespace lemsg_unity_$${n%.cpp} {"; echo "#include \"$$f\""; echo "}"; done; } > $@.new
	@if cmp -s $@.new $@; then rm -f $@.new; else mv -f $@.new $@; fi

# The block between the quickstart markers of README.md, fences removed.
build/%/readme_example.cpp: README.md
	@mkdir -p $(@D)
	$(Q)awk '/<!-- quickstart begin -->/{f=1;next} /<!-- quickstart end -->/{f=0} f' $< \
	  | sed '/^```/d' > $@.new && [ -s $@.new ] && mv -f $@.new $@
build/%/readme_modem_api.hpp: README.md
	@mkdir -p $(@D)
	$(Q)awk '/<!-- modem api begin -->/{f=1;next} /<!-- modem api end -->/{f=0} f' $< \
	  | sed '/^```/d' > $@.new && [ -s $@.new ] && mv -f $@.new $@
build/%/readme_typed.cpp: README.md
	@mkdir -p $(@D)
	$(Q)awk '/<!-- typed quickstart begin -->/{f=1;next} /<!-- typed quickstart end -->/{f=0} f' $< \
	  | sed '/^```/d' > $@.new && [ -s $@.new ] && mv -f $@.new $@
# The bindings file between the bindings example markers, as a C++ raw string.
build/%/readme_bindings.inc: README.md
	@mkdir -p $(@D)
	$(Q)awk '/<!-- bindings example begin -->/{f=1;next} /<!-- bindings example end -->/{f=0} f' $< \
	  | sed '/^```/d' > $@.txt && [ -s $@.txt ] && \
	  { echo 'R"lemsg_bindings('; cat $@.txt; echo ')lemsg_bindings"'; } > $@.new && rm -f $@.txt && mv -f $@.new $@

# A handler capture larger than LEMSG_CALLABLE_SIZE must not compile (with
# g++ and clang++), and the same program at exactly the limit must: so the
# error is the size check and nothing else.
COMPILE_FAIL_SRC := tests/compile_fail/callable_too_large.cpp
build/%/compile-fail.ok: $(COMPILE_FAIL_SRC) lemsg.hpp
	@mkdir -p $(@D)
	$(Q)if $(cxx.$*) $(BASEFLAGS) -fsyntax-only $< > $(@D)/compile-fail.log 2>&1; then \
	  echo "$<: compiled, but a capture over LEMSG_CALLABLE_SIZE must be an error" >&2; exit 1; fi
	$(Q)grep -q LEMSG_CALLABLE_SIZE $(@D)/compile-fail.log || \
	  { cat $(@D)/compile-fail.log >&2; echo "$<: failed for another reason" >&2; exit 1; }
	$(Q)$(cxx.$*) $(BASEFLAGS) -DLEMSG_EXPECT_OK -fsyntax-only $<
	$(Q)touch $@
ifneq ($(filter host clang,$(TARGET)),)
build/$(TARGET)/run.sh: build/$(TARGET)/compile-fail.ok
endif

# -- size ----------------------------------------------------------------------

size_programs = $(patsubst tests/%.cpp,build/$(1)-size/%,tests/size_empty.cpp $(SIZE_SRCS))

size:
	$(Q)$(MAKE) -k --no-print-directory $(addprefix size-build-,$(SUITE_TARGETS.size))
	$(Q)for t in $(SUITE_TARGETS.size); do \
	  $(MAKE) --no-print-directory TARGET=$$t size-report || exit 1; done

$(addprefix size-build-,$(TARGETS)): size-build-%:
	$(Q)$(MAKE) --no-print-directory TARGET=$* size-build
size-build: $(call size_programs,$(TARGET)) build/$(TARGET)-size/size_objects.o
.PHONY: size-build $(addprefix size-build-,$(TARGETS))

build/$(TARGET)-size/%: tests/%.cpp build/$(TARGET)-size/flags
	$(say) CXX $@
	@mkdir -p $(@D)
	$(Q)$(CXX) $(BASEFLAGS) $(SIZE_OPT) $(BASELDFLAGS) $(SIZE_LDFLAGS) \
	  -MMD -MP -MF $@.d -MT $@ -o $@ $< $(BASELDLIBS)

build/$(TARGET)-size/size_objects.o: tests/size_objects.cpp build/$(TARGET)-size/flags
	$(say) CXX $@
	@mkdir -p $(@D)
	$(Q)$(CXX) $(BASEFLAGS) $(SIZE_OPT) -MMD -MP -MF $@.d -MT $@ -c -o $@ $<

build/$(TARGET)-size/flags: FORCE
	@mkdir -p $(@D)
	@printf '%s\n' '$(subst ','\'',$(CXX) $(BASEFLAGS) $(SIZE_OPT) $(BASELDFLAGS) $(SIZE_LDFLAGS) $(BASELDLIBS))' > $@.new
	@if cmp -s $@.new $@; then rm -f $@.new; else mv -f $@.new $@; fi

-include $(wildcard build/$(TARGET)-size/*.d)

# "size <target> <program>: text +T data +D bss +B" is the program minus
# size_empty (the C++ runtime and libc every program pays for).
size-report:
	$(Q)set -- $$($(CROSS_COMPILE)size -B build/$(TARGET)-size/size_empty | sed -n 2p); \
	  t0=$$1 d0=$$2 b0=$$3; \
	  echo "size $(TARGET) empty: text $$t0 data $$d0 bss $$b0"; \
	  for p in $(filter-out %/size_empty,$(call size_programs,$(TARGET))); do \
	    set -- $$($(CROSS_COMPILE)size -B $$p | sed -n 2p); \
	    n=$${p##*/size_}; \
	    echo "size $(TARGET) $$n: text +$$(($$1-t0)) data +$$(($$2-d0)) bss +$$(($$3-b0)) (program: text $$1 data $$2 bss $$3)"; \
	  done; \
	  objs=$$($(CROSS_COMPILE)nm -S -t d build/$(TARGET)-size/size_objects.o | \
	    awk '$$4 ~ /^lemsg_size_of_/ { sub(/^lemsg_size_of_/, "", $$4); printf " %s %d", $$4, $$2 + 0 }'); \
	  echo "size $(TARGET) objects (bytes):$$objs"; \
	  if [ "$(TARGET)" = armhf ]; then \
	    for o in Loop Service Session; do \
	      b=$$(echo "$$objs" | awk -v o=$$o '{ for (i = 1; i < NF; i += 2) if ($$i == o) print $$(i+1) }'); \
	      r=$$(sed -n 's/^| `'$$o'` *| *\([0-9,]*\) B.*/\1/p' README.md | tr -d ,); \
	      [ "$$b" = "$$r" ] || { echo "size: README says $$o is '$$r' B on armhf, the build says $$b B" >&2; exit 1; }; \
	    done; \
	  fi
.PHONY: size-report

# -- examples ------------------------------------------------------------------

EXAMPLE_BINS := $(patsubst examples/%.cpp,build/$(TARGET)/examples/%,$(EXAMPLE_SRCS))

build-examples: $(EXAMPLE_BINS)
	@:

# examples: builds them, then runs each client/server pair of EXAMPLE_PAIRS:
# the server in the background, the client in the foreground, each under
# $(EXEC) with a time limit, both in a private runtime directory. Fails
# unless both exit 0. (make test runs every example's code, these and the
# ones that need a signal or a restart, in forked processes: see
# tests/examples.cpp.)
EXAMPLE_PAIRS ?= modem pubsub window fdpass ownloop
MODEM_TIMEOUT ?= 30
examples: build-examples
	$(Q)fail=0; for e in $(EXAMPLE_PAIRS); do \
	  b=build/$(TARGET)/examples/$$e; \
	  d=$$(mktemp -d "$${TMPDIR:-/tmp}/lemsg-$$e.XXXXXX") || exit 1; \
	  LEMSG_RUNTIME_DIR=$$d timeout -k 5 $(MODEM_TIMEOUT) $(EXEC) ./$$b/server > $$d.server.log 2>&1 & srv=$$!; \
	  LEMSG_RUNTIME_DIR=$$d timeout -k 5 $(MODEM_TIMEOUT) $(EXEC) ./$$b/client; crc=$$?; \
	  wait $$srv; src=$$?; \
	  echo "examples $(TARGET): $$e client exit $$crc, server exit $$src"; \
	  if [ "$$crc" != 0 ] || [ "$$src" != 0 ]; then fail=1; sed 's/^/  server: /' $$d.server.log; fi; \
	  rm -rf "$$d" "$$d.server.log"; \
	done; exit $$fail

# Programs compile to an object, then link, as the tests do: zig 0.11
# (musl-armhf) crashes compiling and linking 32-bit ARM in one step above -O0.
program_cmd = $(CXX) $(BASEFLAGS) $(PROGRAM_OPT) -MMD -MP -MF $@.d -MT $@ -c -o $@.o $< && \
  $(CXX) $(BASEFLAGS) $(PROGRAM_OPT) $(BASELDFLAGS) -o $@ $@.o $(BASELDLIBS) && rm -f $@.o
build/$(TARGET)/examples/%: examples/%.cpp build/$(TARGET)/examples/flags
	$(say) CXX $@
	@mkdir -p $(@D)
	$(Q)$(program_cmd)

build/$(TARGET)/examples/flags: FORCE
	@mkdir -p $(@D)
	@printf '%s\n' '$(subst ','\'',$(CXX) $(BASEFLAGS) $(PROGRAM_OPT) $(BASELDFLAGS) $(BASELDLIBS))' > $@.new
	@if cmp -s $@.new $@; then rm -f $@.new; else mv -f $@.new $@; fi

-include $(wildcard build/$(TARGET)/examples/*.d build/$(TARGET)/examples/*/*.d)

# -- bench and demo ------------------------------------------------------------

# bench: one target (host unless TARGET says otherwise), built at -O2 and run
# under its emulator. BENCH_ARGS is passed on (e.g. a smaller scale).
BENCH_ARGS ?=
bench: build/$(TARGET)/bench
	$(Q)$(EXEC) ./build/$(TARGET)/bench $(BENCH_ARGS)
build/$(TARGET)/bench: tests/bench.cpp build/$(TARGET)/examples/flags
	$(say) CXX $@
	@mkdir -p $(@D)
	$(Q)$(program_cmd)
-include $(wildcard build/$(TARGET)/bench.d)

# demo: the story of examples/demo.cpp, on TARGET (host by default).
demo:
	$(Q)$(INSTALL_DEPS) $(TARGET)
	$(Q)$(MAKE) --no-print-directory build/$(TARGET)/examples/demo
	$(Q)timeout -k 5 60 $(EXEC) ./build/$(TARGET)/examples/demo

# demo-directory: examples/directory with the service directory, in a private
# runtime dir: lemsg-dir with a bindings file, the server as one user and the
# client as another (uids 1500 and 1501 through setpriv when run as root;
# otherwise all three as this user), then `lemsg list` while they run.
DEMO_DIR_BINS := $(addprefix build/$(TARGET)/examples/,lemsg-dir lemsg directory/server directory/client)
demo-directory:
	$(Q)$(MAKE) --no-print-directory $(DEMO_DIR_BINS)
	$(Q)b=build/$(TARGET)/examples; d=$$(mktemp -d "$${TMPDIR:-/tmp}/lemsg-demo.XXXXXX") || exit 1; \
	  chmod 755 "$$d"; export LEMSG_RUNTIME_DIR=$$d LEMSG_DIRECTORY=1; \
	  if [ "$$(id -u)" = 0 ] && command -v setpriv > /dev/null; then \
	    su="setpriv --reuid=1500 --regid=1500 --clear-groups"; cu="setpriv --reuid=1501 --regid=1501 --clear-groups"; \
	    echo "1501.position -> 1500.location   # the UI app's position is the GNSS app's location" > $$d/bindings; \
	  else \
	    su=; cu=; u=$$(id -u); echo "$$u.position -> $$u.location" > $$d/bindings; \
	  fi; \
	  echo "bindings file:"; sed 's/^/  /' $$d/bindings; \
	  timeout -k 5 60 $(EXEC) ./$$b/lemsg-dir -b $$d/bindings & dir=$$!; \
	  for i in 1 2 3 4 5 6 7 8 9 10; do [ -S $$d/directory ] && break; sleep 0.2; done; \
	  timeout -k 5 30 $$su $(EXEC) ./$$b/directory/server & srv=$$!; \
	  timeout -k 5 30 $(EXEC) ./$$b/lemsg wait location 10000 && timeout -k 5 30 $(EXEC) ./$$b/lemsg list; \
	  timeout -k 5 30 $$cu $(EXEC) ./$$b/directory/client; crc=$$?; \
	  wait $$srv; src=$$?; kill $$dir; wait $$dir; rm -rf "$$d"; \
	  echo "demo-directory $(TARGET): client exit $$crc, server exit $$src"; \
	  [ "$$crc" = 0 ] && [ "$$src" = 0 ]
.PHONY: bench demo demo-directory

# -- fuzz ----------------------------------------------------------------------

# make fuzz [FUZZ_SECONDS=48] [FUZZ_MERGE=1] [FUZZ_NAMES='service']: builds
# each target of tests/fuzz/ with clang++ and libFuzzer, ASan and UBSan, and
# runs it for FUZZ_SECONDS, one after the other, starting from its corpus in
# tests/fuzz/corpus/<name>/. New inputs go to build/fuzz/<name>.new/ and crash
# inputs to build/fuzz/<name>.crashes/; with FUZZ_MERGE=1 the corpus in the
# tree is rebuilt as the hand-written seeds (files not named by a SHA-1) plus
# the smallest set of corpus and new inputs that covers every edge they cover
# (-merge=1 -use_counters=0: a hundred or so files, quick to replay under
# qemu), and crash inputs are copied to tests/fuzz/corpus/crashes/<name>/
# (not replayed by make test until fixed and moved into the corpus).
# Prints per target: executions, coverage
# (cov and ft from libFuzzer's final stats) and crashes; fails on a crash.
# 48 s each: five targets take about 4 minutes (what CI gives the fuzz step).
FUZZ_SECONDS ?= 48
FUZZ_MERGE ?= 0
FUZZ_MAX_LEN ?= 512
FUZZ_CXX ?= $(CLANG_CXX)
FUZZ_FLAGS ?= -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
FUZZ_ARGS ?=

fuzz: $(addprefix build/fuzz/,$(FUZZ_NAMES))
	$(Q)fail=0; for n in $(FUZZ_NAMES); do \
	  new=build/fuzz/$$n.new; crashes=build/fuzz/$$n.crashes; log=build/fuzz/$$n.log; \
	  rm -rf $$new; mkdir -p $$new $$crashes $(FUZZ_CORPUS)/$$n; \
	  d=$$(mktemp -d "$${TMPDIR:-/tmp}/lemsg-fuzz-$$n.XXXXXX"); \
	  before=$$(ls $$crashes | wc -l); \
	  LEMSG_RUNTIME_DIR=$$d ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    ./build/fuzz/$$n -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 -max_len=$(FUZZ_MAX_LEN) \
	    -timeout=20 -artifact_prefix=$$crashes/ $(FUZZ_ARGS) $$new $(FUZZ_CORPUS)/$$n > $$log 2>&1; \
	  st=$$?; rm -rf "$$d"; \
	  execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $$log | tail -n 1); \
	  cov=$$(grep -o 'cov: [0-9]* ft: [0-9]*' $$log | tail -n 1); \
	  found=$$(( $$(ls $$crashes | wc -l) - before )); \
	  echo "fuzz $$n: $${execs:-?} executions in $(FUZZ_SECONDS) s, $${cov:-cov: ? ft: ?}, $$found crashes (log $$log)"; \
	  if [ "$$st" != 0 ] || [ "$$found" != 0 ]; then \
	    fail=1; grep -m 5 -e 'ERROR' -e 'invariant broken' -e 'SUMMARY' -e 'Test unit written' $$log; fi; \
	  if [ "$(FUZZ_MERGE)" = 1 ]; then \
	    $(call fuzz_merge_sh,$$n,$$new) \
	    echo "fuzz $$n: corpus merged, $$(ls $(FUZZ_CORPUS)/$$n | wc -l) inputs in $(FUZZ_CORPUS)/$$n"; \
	    if [ -n "$$(ls $$crashes)" ]; then mkdir -p $(FUZZ_CORPUS)/crashes/$$n && cp $$crashes/* $(FUZZ_CORPUS)/crashes/$$n/; fi; \
	  fi; \
	done; exit $$fail

# $(call fuzz_merge_sh,<name>,<dir of new inputs>): the merge described above.
define fuzz_merge_sh
m=build/fuzz/$(1).min; rm -rf $$m; mkdir -p $$m; \
	    d=$$(mktemp -d "$${TMPDIR:-/tmp}/lemsg-fuzz-$(1).XXXXXX"); \
	    if LEMSG_RUNTIME_DIR=$$d ./build/fuzz/$(1) -merge=1 -use_counters=0 -max_len=$(FUZZ_MAX_LEN) \
	         $$m $(FUZZ_CORPUS)/$(1) $(2) > build/fuzz/$(1).merge.log 2>&1; then \
	      seeds=$$(cd $(FUZZ_CORPUS)/$(1) && ls | grep -v -x -E '[0-9a-f]{40}' | xargs -r sha1sum | cut -c1-40); \
	      find $(FUZZ_CORPUS)/$(1) -maxdepth 1 -type f -regextype posix-extended -regex '.*/[0-9a-f]{40}' -delete; \
	      for f in $$m/*; do case " $$seeds " in *" $${f##*/} "*) ;; *) cp $$f $(FUZZ_CORPUS)/$(1)/;; esac; done; \
	    else fail=1; echo "fuzz $(1): merge failed (build/fuzz/$(1).merge.log)"; fi; \
	    rm -rf "$$d";
endef

build/fuzz/%: tests/fuzz/%.cpp tests/fuzz/fuzz.hpp lemsg.hpp
	$(say) CXX $@
	@mkdir -p $(@D)
	$(Q)$(FUZZ_CXX) $(LANGFLAGS) $(WARNFLAGS) -I. -D_FILE_OFFSET_BITS=64 $(CPPFLAGS) $(CXXFLAGS) $(FUZZ_FLAGS) \
	  -o $@ $< $(LDFLAGS)
.PHONY: fuzz

# -- install -------------------------------------------------------------------

# lemsg.pc's Version is LEMSG_VERSION_STR, or MAJOR.MINOR.PATCH when the
# string is not a plain literal.
install: build/$(TARGET)/examples/lemsg-dir build/$(TARGET)/examples/lemsg
	$(Q)v=$$(sed -n 's/^[[:space:]]*#[[:space:]]*define[[:space:]][[:space:]]*LEMSG_VERSION_STR[[:space:]][[:space:]]*"\([^"]*\)".*/\1/p' lemsg.hpp | head -n 1); \
	  if [ -z "$$v" ]; then \
	    num() { sed -n "s/^[[:space:]]*#[[:space:]]*define[[:space:]][[:space:]]*LEMSG_VERSION_$$1[[:space:]][[:space:]]*\([0-9][0-9]*\).*/\1/p" lemsg.hpp | head -n 1; }; \
	    v=$$(num MAJOR).$$(num MINOR).$$(num PATCH); \
	  fi; \
	  case "$$v" in ""|.*|*..*|*.) echo "install: no version found in lemsg.hpp (LEMSG_VERSION_STR)" >&2; exit 1;; esac; \
	  install -d "$(DESTDIR)$(PREFIX)/include" "$(DESTDIR)$(PKGCONFIGDIR)" && \
	  install -m 644 lemsg.hpp "$(DESTDIR)$(PREFIX)/include/lemsg.hpp" && \
	  sed -e 's|@PREFIX@|$(PREFIX)|g' \
	      -e "s|@VERSION@|$$v|g" toolchains/lemsg.pc.in > "$(DESTDIR)$(PKGCONFIGDIR)/lemsg.pc" && \
	  chmod 644 "$(DESTDIR)$(PKGCONFIGDIR)/lemsg.pc" && \
	  install -d "$(DESTDIR)$(PREFIX)/bin" && \
	  install -m 755 build/$(TARGET)/examples/lemsg-dir build/$(TARGET)/examples/lemsg "$(DESTDIR)$(PREFIX)/bin/" && \
	  echo "installed lemsg $$v: $(DESTDIR)$(PREFIX)/include/lemsg.hpp, $(DESTDIR)$(PKGCONFIGDIR)/lemsg.pc, $(DESTDIR)$(PREFIX)/bin/lemsg-dir and lemsg ($(TARGET))"

# -- packaging -----------------------------------------------------------------

# consumer: tests/consumer.sh builds and runs tests/consumer, a C++20 program
# using lemsg, through CMake (add_subdirectory of this tree, and find_package
# after `cmake --install`; host and armhf under qemu, and add_subdirectory
# with each other CMake toolchain file) and through pkg-config after
# `make install` (host; builds lemsg-dir and lemsg for the host too), in
# build/consumer/. One line per case; fails on any failure.
consumer:
	$(Q)$(INSTALL_DEPS) host armhf aarch64 armel mips packaging
	$(Q)MAKE='$(MAKE)' bash tests/consumer.sh
.PHONY: consumer

FORCE:
