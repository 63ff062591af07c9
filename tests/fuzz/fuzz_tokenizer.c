// Fuzz target: the tokenizer, encoding any bytes and decoding any ids, with
// the tokenizer of MIXTRAL_FUZZ_MODEL. The first byte picks: even, encode the
// rest and decode what came out; odd, decode the rest as 16-bit ids.
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const Tokenizer *t = fuzz_tokenizer();
    if (size == 0) return 0;
    char *out = malloc(decoder_max_bytes(t));
    TokenDecoder d;
    decoder_init(&d);
    if (data[0] % 2 == 0) {
        int *ids;
        int n = tokenizer_encode(t, (const char *)data + 1, size - 1, &ids);
        if (n < 0) abort();
        for (int i = 0; i < n; i++) {
            if (ids[i] < 0 || ids[i] >= t->vocab_size) abort();
            decoder_put(&d, t, ids[i], out);
        }
        free(ids);
    } else {
        for (size_t i = 1; i + 1 < size; i += 2) decoder_put(&d, t, (data[i] | data[i + 1] << 8) % t->vocab_size, out);
    }
    decoder_flush(&d, out);
    free(out);
    return 0;
}
