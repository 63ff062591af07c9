// fuzz.h: what the fuzz targets share. Each target is one .c file defining
// LLVMFuzzerTestOneInput; `make fuzz` builds them with clang's libFuzzer
// (ASan + UBSan) and runs each for FUZZ_SECONDS; replay.c runs the committed
// corpus through them without libFuzzer, which `make test` does.
//
// The engine is included whole, with MIXTRAL_FUZZ: its die() then jumps back
// to die_jump instead of exiting, so an input that is refused ends the run of
// that input, and the fuzzer goes on.
#define MIXTRAL_NO_MAIN
#ifndef MIXTRAL_FUZZ
#define MIXTRAL_FUZZ // (the build gives it to every file: util.c's die() reads it)
#endif
#include "../../mixtral.c"

#include <stdio.h>

// The tokenizer of the model file named by MIXTRAL_FUZZ_MODEL (tokenizer and
// chat targets), loaded once.
static Model fuzz_model;

static const Tokenizer *fuzz_tokenizer(void) {
    static int loaded;
    if (!loaded) {
        const char *path = getenv("MIXTRAL_FUZZ_MODEL");
        if (!path) { fprintf(stderr, "set MIXTRAL_FUZZ_MODEL to a model file (its tokenizer is used)\n"); abort(); }
        if (setjmp(die_jump)) { fprintf(stderr, "MIXTRAL_FUZZ_MODEL=%s does not load\n", path); abort(); }
        model_load(&fuzz_model, path, LOAD_MMAP, NULL, 0, 0, 1, KV_F32, EXPERT_CACHE_LRU);
        loaded = 1;
    }
    return &fuzz_model.tokenizer;
}
