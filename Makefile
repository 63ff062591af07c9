# mixtral.c build. Options are variables: make CC=clang ARCH= THREADS=4
CC ?= cc
ARCH ?= -march=native
CFLAGS ?= -O3 $(ARCH) -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE
LDLIBS = -lm -lpthread
PYTHON ?= /usr/bin/python3
SRC = mixtral.c kernels.c pool.c chat.c tokenizer.c
HDR = kernels.h pool.h chat.h tokenizer.h

all: mixtral

mixtral: $(SRC) $(HDR)
	$(CC) $(CFLAGS) -o $@ $(SRC) $(LDLIBS)

# sanitizers, no optimisation surprises: what the tests also build and run
mixtral-debug: $(SRC) $(HDR)
	$(CC) -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE -o $@ $(SRC) $(LDLIBS)

debug: mixtral-debug

# test drivers #include mixtral.c, so functions they do not call are expected
tests/tok_batch: tests/tok_batch.c $(SRC) $(HDR)
	$(CC) $(CFLAGS) -Wno-unused-function -Wno-unused-variable -I. -o $@ tests/tok_batch.c kernels.c pool.c chat.c tokenizer.c $(LDLIBS)

test: mixtral mixtral-debug tests/tok_batch
	tests/deps.sh
	$(PYTHON) tests/run_tests.py

# the NEON kernels cross-compiled for aarch64 and run under qemu (installs both with apt)
test-cross: mixtral mixtral-debug tests/tok_batch
	tests/deps.sh
	tests/deps.sh --cross
	$(PYTHON) tests/run_tests.py --cross

# The demo: the small Mixtral trained by demo/train.py (shipped in demo/model),
# exported on first use and whenever export.py or the model changes.
DEMO_BIN = .cache/demo-bf16.bin
$(DEMO_BIN): export.py demo/model/config.json demo/model/model.safetensors.index.json
	@$(PYTHON) -c "import numpy" 2>/dev/null || { echo "make run: $(PYTHON) has no numpy, which export.py needs: install it (Debian: apt-get install python3-numpy) or name a Python that has it: make run PYTHON=..." >&2; exit 1; }
	@mkdir -p .cache
	$(PYTHON) export.py demo/model $@ --type bf16

run: mixtral $(DEMO_BIN)
	./mixtral $(DEMO_BIN) -i "And it came to pass" -n 96 -t 0.8 -s 2

# Speed against memory bandwidth on Mixtral-8x7B layer shapes (see bench/bench.py); with
# LLAMA_BENCH / IK_BENCH (peers' llama-bench) and GGUF_Q8 / GGUF_Q4 / GGUF_BF16 (the same
# checkpoint as GGUF) the peers run beside ours, round by round.
bench/bandwidth: bench/bandwidth.c
	$(CC) $(CFLAGS) -o $@ $< -lpthread

BENCH_PEERS = $(if $(LLAMA_BENCH),--llama-bench $(LLAMA_BENCH)) $(if $(IK_BENCH),--ik-bench $(IK_BENCH)) \
	$(if $(GGUF_Q8),--gguf q8=$(GGUF_Q8)) $(if $(GGUF_Q4),--gguf q4=$(GGUF_Q4)) $(if $(GGUF_BF16),--gguf bf16=$(GGUF_BF16))

bench: mixtral bench/bandwidth
	tests/deps.sh
	$(PYTHON) bench/bench.py $(BENCH_PEERS) $(BENCH_ARGS)

# How much each weight format loses (KL divergence from bf16, see bench/quality.py); with
# LLAMA_PERPLEXITY and QUALITY_ARGS="--gguf bench:bf16=... --gguf bench:Q8_0=..." llama.cpp's beside ours.
quality: mixtral
	tests/deps.sh
	$(PYTHON) bench/quality.py $(if $(LLAMA_PERPLEXITY),--llama-perplexity $(LLAMA_PERPLEXITY)) $(QUALITY_ARGS)

clean:
	rm -f mixtral mixtral-debug tests/tok_batch bench/bandwidth

.PHONY: all debug test test-cross run bench quality clean
