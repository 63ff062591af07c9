# mixtral.c build. Options are variables: make CC=clang ARCH= THREADS=4
CC ?= cc
# -march=native, but Apple's clang on Apple silicon takes -mcpu instead
ifeq ($(shell uname -s)-$(shell uname -m),Darwin-arm64)
ARCH ?= -mcpu=apple-m1
else
ARCH ?= -march=native
endif
# warnings are errors in the tests' builds and CI (make test), not in a user's make: a newer
# compiler's new warning must not stop a build
WERROR ?=
CFLAGS ?= -O3 $(ARCH) -Wall -Wextra $(WERROR) -std=c11 -D_GNU_SOURCE
LDLIBS = -lm -lpthread
PYTHON ?= /usr/bin/python3
# the engine, and what a program that #includes mixtral.c (the test drivers) links with it
LIB = eval.c expert_cache.c session.c util.c kernels.c pool.c chat.c tokenizer.c
SRC = mixtral.c $(LIB)
HDR = mixtral.h eval.h expert_cache.h session.h util.h kernels.h pool.h chat.h tokenizer.h

all: mixtral

mixtral: $(SRC) $(HDR)
	$(CC) $(CFLAGS) -o $@ $(SRC) $(LDLIBS)

# sanitizers, no optimisation surprises: what the tests also build and run
mixtral-debug: $(SRC) $(HDR)
	$(CC) -O1 -g -fsanitize=address,undefined,float-cast-overflow -fno-omit-frame-pointer -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE -o $@ $(SRC) $(LDLIBS)

debug: mixtral-debug

# test drivers #include mixtral.c, so functions they do not call are expected
tests/tok_batch: tests/tok_batch.c $(SRC) $(HDR)
	$(CC) $(CFLAGS) -Wno-unused-function -Wno-unused-variable -I. -o $@ tests/tok_batch.c $(LIB) $(LDLIBS)

tests/sample_draws: tests/sample_draws.c $(SRC) $(HDR)
	$(CC) $(CFLAGS) -Wno-unused-function -Wno-unused-variable -I. -o $@ tests/sample_draws.c $(LIB) $(LDLIBS)

test: WERROR = -Werror
test: mixtral mixtral-debug tests/tok_batch tests/sample_draws
	tests/deps.sh
	$(PYTHON) tests/run_tests.py

# the NEON kernels cross-compiled for aarch64 and run under qemu (installs both with apt)
test-cross: WERROR = -Werror
test-cross: mixtral mixtral-debug tests/tok_batch tests/sample_draws
	tests/deps.sh
	tests/deps.sh --cross
	$(PYTHON) tests/run_tests.py --cross

# The demo: the small Mixtral trained by demo/train.py (shipped in demo/model),
# exported on first use and whenever export.py or the model changes.
DEMO_BIN = .cache/demo-bf16.bin
# (a bf16 export of the bf16 demo needs Python alone: no numpy)
$(DEMO_BIN): export.py demo/model/config.json demo/model/model.safetensors.index.json
	@mkdir -p .cache
	$(PYTHON) export.py demo/model $@ --type bf16

run: mixtral $(DEMO_BIN)
	./mixtral $(DEMO_BIN) -i "And it came to pass" -n 96 -t 0.8 -s 2

# Speed against memory bandwidth on Mixtral-8x7B layer shapes (see bench/bench.py); with
# LLAMA_BENCH / IK_BENCH (peers' llama-bench) and GGUF_Q8 / GGUF_Q4 / GGUF_BF16 / GGUF_Q3 / GGUF_Q2
# (the same checkpoint as GGUF: IQ3_XXS, IQ2_XS) and IK_GGUF_Q3 / IK_GGUF_Q2 (IQ3_KS, IQ2_KS, for
# ik_llama.cpp) the peers run beside ours, round by round.
bench/bandwidth: bench/bandwidth.c
	$(CC) $(CFLAGS) -o $@ $< -lpthread

# The quantized kernel on one core against the core's vpdpbusd peak (bench/kernel.c)
bench/kernel: bench/kernel.c kernels.c kernels.h
	$(CC) $(CFLAGS) -o $@ bench/kernel.c kernels.c -lm

bench-kernel: bench/kernel
	bench/kernel

BENCH_PEERS = $(if $(LLAMA_BENCH),--llama-bench $(LLAMA_BENCH)) $(if $(IK_BENCH),--ik-bench $(IK_BENCH)) \
	$(if $(GGUF_Q8),--gguf q8=$(GGUF_Q8)) $(if $(GGUF_Q4),--gguf q4=$(GGUF_Q4)) $(if $(GGUF_BF16),--gguf bf16=$(GGUF_BF16)) \
	$(if $(GGUF_Q3),--gguf q3=$(GGUF_Q3)) $(if $(GGUF_Q2),--gguf q2=$(GGUF_Q2)) \
	$(if $(IK_GGUF_Q3),--ik-gguf q3=$(IK_GGUF_Q3)) $(if $(IK_GGUF_Q2),--ik-gguf q2=$(IK_GGUF_Q2))

bench: mixtral bench/bandwidth
	tests/deps.sh
	$(PYTHON) bench/bench.py $(BENCH_PEERS) $(BENCH_ARGS)

# Decoding a model larger than memory: the expert cache against plain mapping under real memory
# pressure (bench/paging.py); with LLAMA_BENCH and GGUF_Q4, llama.cpp under the same pressure.
bench-paging: mixtral
	tests/deps.sh
	$(PYTHON) bench/paging.py $(if $(LLAMA_BENCH),--llama-bench $(LLAMA_BENCH)) $(if $(GGUF_Q4),--gguf $(GGUF_Q4)) $(PAGING_ARGS)

# How much each weight format loses (KL divergence from bf16, see bench/quality.py); with
# LLAMA_PERPLEXITY and QUALITY_ARGS="--gguf bench:bf16=... --gguf bench:IQ2_XS=..." llama.cpp's beside ours,
# with IK_PERPLEXITY and "--ik-gguf bench:bf16=... --ik-gguf bench:IQ2_KS=..." ik_llama.cpp's; ours at each one's size.
quality: mixtral
	tests/deps.sh
	$(PYTHON) bench/quality.py $(if $(LLAMA_PERPLEXITY),--llama-perplexity $(LLAMA_PERPLEXITY)) \
		$(if $(IK_PERPLEXITY),--ik-perplexity $(IK_PERPLEXITY)) $(QUALITY_ARGS)

# Fuzzing: each target of tests/fuzz with clang's libFuzzer, ASan and UBSan, for FUZZ_SECONDS,
# starting from the committed seeds (tests/fuzz/corpus) and keeping what it finds in .cache/fuzz;
# then EXPORT_MUTATIONS mutated checkpoints through export.py (tests/export_mutations.py).
# `make test` replays the committed corpus through the same targets without libFuzzer.
FUZZ_SECONDS ?= 60
EXPORT_MUTATIONS ?= 10000
FUZZ_CC ?= clang
FUZZ_TARGETS = model tokenizer chat options session
FUZZ_MODEL = .cache/fuzz/tokenizer-v1.bin

tests/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.h $(SRC) $(HDR)
	$(FUZZ_CC) -O1 -g -fsanitize=fuzzer,address,undefined,float-cast-overflow -fno-sanitize-recover=all \
		-std=c11 -D_GNU_SOURCE -DMIXTRAL_FUZZ -Wno-unused-function -I. -o $@ $< $(LIB) $(LDLIBS)

$(FUZZ_MODEL): export.py tests/fuzz/make_seeds.py
	@mkdir -p .cache/fuzz
	$(PYTHON) tests/fuzz/make_seeds.py --tokenizer-model $@

fuzz: mixtral $(FUZZ_TARGETS:%=tests/fuzz/fuzz_%) $(FUZZ_MODEL)
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p .cache/fuzz/corpus_$$t; \
		echo "fuzz_$$t: $(FUZZ_SECONDS) s"; \
		MIXTRAL_FUZZ_MODEL=$(FUZZ_MODEL) tests/fuzz/fuzz_$$t .cache/fuzz/corpus_$$t tests/fuzz/corpus/$$t \
			-max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=4096 -detect_leaks=0 -print_final_stats=1 \
			-artifact_prefix=.cache/fuzz/crash_$$t- 2>&1 | grep -E "^(stat::number_of_executed_units|stat::peak_rss|==|SUMMARY|.*(ERROR|crash|timeout))" \
			|| true; \
		ls .cache/fuzz/crash_$$t-* 2>/dev/null && { echo "fuzz_$$t: crashes saved above"; exit 1; } || true; \
	done
	$(PYTHON) tests/export_mutations.py --n $(EXPORT_MUTATIONS)

# make install [PREFIX=/usr/local]: the program as PREFIX/bin/mixtral, export.py as the command
# PREFIX/bin/mixtral-export (it runs PYTHON on PREFIX/share/mixtral/export.py); make uninstall.
PREFIX ?= /usr/local
install: mixtral
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/mixtral
	install -m 755 mixtral $(DESTDIR)$(PREFIX)/bin/mixtral
	install -m 644 export.py $(DESTDIR)$(PREFIX)/share/mixtral/export.py
	printf '#!/bin/sh\nexec %s %s "$$@"\n' '$(PYTHON)' '$(PREFIX)/share/mixtral/export.py' > $(DESTDIR)$(PREFIX)/bin/mixtral-export
	chmod 755 $(DESTDIR)$(PREFIX)/bin/mixtral-export

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/mixtral $(DESTDIR)$(PREFIX)/bin/mixtral-export $(DESTDIR)$(PREFIX)/share/mixtral/export.py
	-rmdir $(DESTDIR)$(PREFIX)/share/mixtral 2>/dev/null

clean:
	rm -f mixtral mixtral-debug tests/tok_batch tests/sample_draws bench/bandwidth bench/kernel $(FUZZ_TARGETS:%=tests/fuzz/fuzz_%)

.PHONY: all debug test test-cross run bench bench-kernel bench-paging quality fuzz install uninstall clean
