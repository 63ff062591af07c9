// Fuzz target: the session-file reader (--session), on any bytes, for the
// model of MIXTRAL_FUZZ_MODEL with a q8 KV cache of 64 positions. So that
// mutations get past the two checks that name the file's model and guard its
// bytes, the input's model hash is set to the model's, and when its ninth byte
// is odd its checksum is recomputed.
#include "fuzz.h"

#include "../../session.h"

static State fuzz_state;

static void free_state(void) { state_free(&fuzz_state, &fuzz_model.config); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_tokenizer(); // loads fuzz_model
    static int stated;
    if (!stated) {
        state_init(&fuzz_state, &fuzz_model.config, 64, 4, KV_Q8, 0, NULL);
        atexit(free_state); // (LeakSanitizer checks at exit)
        stated = 1;
    }
    State *s = &fuzz_state;
    uint8_t *raw = malloc(size ? size : 1);
    memcpy(raw, data, size);
    if (size >= 16) {
        int fix_sum = data[8] & 1;
        uint64_t h = session_model_hash(&fuzz_model);
        memcpy(raw + 8, &h, 8);
        if (fix_sum && size >= 48) {
            uint64_t sum = session_checksum(raw, size - 8);
            memcpy(raw + size - 8, &sum, 8);
        }
    }
    static const int ids[] = {1, 5, 7, 9, 11, 13};
    if (!setjmp(die_jump)) {
        int same = session_resume_bytes(raw, size, "fuzz", &fuzz_model, s, ids, 6);
        if (same < 0 || same > 5) abort();
    }
    free(raw);
    return 0;
}
