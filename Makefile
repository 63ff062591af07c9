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

test: mixtral mixtral-debug
	$(PYTHON) tests/run_tests.py

clean:
	rm -f mixtral mixtral-debug

.PHONY: all debug test clean
