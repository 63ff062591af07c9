# mixtral.c build. Options are variables: make CC=clang ARCH= THREADS=4
CC ?= cc
ARCH ?= -march=native
CFLAGS ?= -O3 $(ARCH) -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE
LDLIBS = -lm -lpthread
PYTHON ?= /usr/bin/python3
SRC = mixtral.c tokenizer.c
HDR = tokenizer.h

all: mixtral

mixtral: $(SRC) $(HDR)
	$(CC) $(CFLAGS) -o $@ $(SRC) $(LDLIBS)

# sanitizers, no optimisation surprises: what the tests also build and run
mixtral-debug: $(SRC) $(HDR)
	$(CC) -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE -o $@ $(SRC) $(LDLIBS)

debug: mixtral-debug

# test drivers #include mixtral.c, so functions they do not call are expected
tests/tok_batch: tests/tok_batch.c $(SRC) $(HDR)
	$(CC) $(CFLAGS) -Wno-unused-function -Wno-unused-variable -I. -o $@ tests/tok_batch.c tokenizer.c $(LDLIBS)

test: mixtral mixtral-debug tests/tok_batch
	tests/deps.sh
	$(PYTHON) tests/run_tests.py

# A small random-weight model, to see the engine run end to end (the text is noise).
DEMO = .cache/demo
run: mixtral
	tests/deps.sh
	@test -f $(DEMO)/model.bin || ( $(PYTHON) tests/hf_checkpoint.py $(DEMO)/hf --dim 256 --hidden-dim 512 --layers 4 \
		--heads 8 --kv-heads 2 --experts 8 --top-k 2 && $(PYTHON) export.py $(DEMO)/hf $(DEMO)/model.bin --type bf16 )
	./mixtral $(DEMO)/model.bin -i "Once upon a time" -n 64

# Speed against memory bandwidth on Mixtral-8x7B layer shapes (see bench/bench.py).
bench/bandwidth: bench/bandwidth.c
	$(CC) $(CFLAGS) -o $@ $< -lpthread

bench: mixtral bench/bandwidth
	tests/deps.sh
	$(PYTHON) bench/bench.py

clean:
	rm -f mixtral mixtral-debug tests/tok_batch bench/bandwidth

.PHONY: all debug test run bench clean
