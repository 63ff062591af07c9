// tok_batch: encodes and decodes many records with tokenizer.c in one process,
// for tests/test_tokenizer.py to compare with the sentencepiece library.
//
//   tok_batch MODEL.bin IN OUT
// IN:  records of u8 kind, u32 n, payload: kind 0 = n bytes of text to encode,
//      kind 1 = n int32 ids to decode.
// OUT: per record, u32 n then the ids (kind 0) or the decoded bytes (kind 1).
#define MIXTRAL_NO_MAIN
#include "../mixtral.c"

static void put_u32(FILE *f, uint32_t v) { fwrite(&v, 4, 1, f); }

int main(int argc, char **argv) {
    if (argc != 4) die("usage: tok_batch MODEL.bin IN OUT");
    Model m;
    model_load(&m, argv[1], LOAD_MMAP, NULL, 0, 0, 1, KV_F32, EXPERT_CACHE_LRU);
    const Tokenizer *t = &m.tokenizer;
    size_t len;
    char *in = read_file(argv[2], &len);
    FILE *out = fopen(argv[3], "wb");
    if (!out) die("cannot write %s", argv[3]);
    for (size_t at = 0; at < len;) {
        if (len - at < 5) die("truncated record");
        uint8_t kind = (uint8_t)in[at];
        uint32_t n;
        memcpy(&n, in + at + 1, 4);
        at += 5;
        if (kind == 0) {
            if (len - at < n) die("truncated record");
            int *ids;
            int k = tokenizer_encode(t, in + at, n, &ids);
            if (k < 0) die("out of memory");
            put_u32(out, (uint32_t)k);
            fwrite(ids, 4, k, out);
            free(ids);
            at += n;
        } else {
            if ((len - at) / 4 < n) die("truncated record");
            char *text = xcalloc((size_t)n + 1, decoder_max_bytes(t)); // one call's worth per id, and the flush
            size_t o = 0;
            TokenDecoder d;
            decoder_init(&d);
            for (uint32_t i = 0; i < n; i++) {
                int32_t id;
                memcpy(&id, in + at + 4 * (size_t)i, 4);
                if (id < 0 || id >= t->vocab_size) die("id %d out of range", id);
                o += decoder_put(&d, t, id, text + o);
            }
            o += decoder_flush(&d, text + o);
            put_u32(out, (uint32_t)o);
            fwrite(text, 1, o, out);
            free(text);
            at += 4 * (size_t)n;
        }
    }
    fclose(out);
    free(in);
    model_free(&m);
    return 0;
}
