// session.c: see session.h. The file (little-endian):
//   "MXSESSN1", u64 the model's hash (model_hash), u32 KV type,
//   u32 kv_len (positions the cache holds), u32 n_layers, u32 n_kv_heads, u32 row bytes,
//   u32 n (tokens), int32 tokens (n,), then for each layer and kv head the keys' rows of
//   positions 0..min(n, kv_len)-1 as they lie in the cache (with a sliding window that
//   wrapped, the whole ring), then the values' the same way; last, u64 FNV-1a of
//   everything before it.
#include "session.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eval.h"

#define SESSION_MAGIC "MXSESSN1"

typedef struct {
    char magic[8];
    uint64_t model;
    uint32_t kv_type, kv_len, n_layers, n_kv_heads, row, n;
} SessionHeader;

static uint64_t fnv1a(const void *data, size_t n, uint64_t h) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ULL;
    return h;
}

// The model file's header and the first and last 4 KB of its weights: another
// export (other weights, other types) of the same shapes differs there; and
// the experts a token runs through.
uint64_t session_model_hash(const Model *m) {
    uint64_t w = m->config.weights_offset, size = m->map_size, n = size - w < 4096 ? size - w : 4096;
    uint64_t h = fnv1a(m->map, HEADER_SIZE, 0xCBF29CE484222325ULL);
    h = fnv1a(&m->config.n_experts_per_tok, sizeof(int32_t), h); // (--experts-per-token changes every key after layer 0)
    h = fnv1a(m->map + w, n, h);
    return fnv1a(m->map + size - n, n, h);
}

// Rows of one kv head of one layer that the file holds for n tokens.
static size_t held_rows(const State *s, uint32_t n) { return n < (uint32_t)s->kv_len ? n : (size_t)s->kv_len; }

static uint8_t *rows_of(uint8_t *kv, const Model *m, const State *s, int l, int h) {
    return kv + ((size_t)l * m->config.n_kv_heads + h) * s->kv_len * s->kv_row;
}

uint64_t session_checksum(const void *data, size_t n) { return fnv1a(data, n, 0xCBF29CE484222325ULL); }

int session_resume(const char *path, const Model *m, State *s, const int *ids, int n) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0; // no session yet: this run makes it
    fclose(f);
    size_t len;
    char *raw = read_file(path, &len);
    int same = session_resume_bytes((const uint8_t *)raw, len, path, m, s, ids, n);
    free(raw);
    return same;
}

int session_resume_bytes(const uint8_t *raw, size_t len, const char *path, const Model *m, State *s, const int *ids,
                         int n) {
    const Config *p = &m->config;
    SessionHeader h;
    if (len < sizeof(h) + 8 || memcmp(raw, SESSION_MAGIC, 8)) die("%s is not a session file of mixtral.c", path);
    memcpy(&h, raw, sizeof(h));
    if (h.model != session_model_hash(m)) die("%s belongs to another model file (or another export of it); use another --session", path);
    if (h.kv_type != (uint32_t)s->kv_type)
        die("%s holds a KV cache of type %s, this run's is %s; use --kv %s or another --session", path,
            h.kv_type < KV_NTYPES ? kv_type_name[h.kv_type] : "?", kv_type_name[s->kv_type],
            h.kv_type < KV_NTYPES ? kv_type_name[h.kv_type] : "?");
    if (h.kv_len != (uint32_t)s->kv_len || h.n_layers != (uint32_t)p->n_layers || h.n_kv_heads != (uint32_t)p->n_kv_heads ||
        h.row != s->kv_row || h.n > (uint32_t)s->context)
        die("%s was made with another context (-c): its KV cache holds %u positions, this run's %d", path, h.kv_len,
            s->kv_len);
    size_t rows = held_rows(s, h.n), body = (size_t)h.n * 4 + 2 * (size_t)p->n_layers * p->n_kv_heads * rows * s->kv_row;
    if (len != sizeof(h) + body + 8) die("%s is truncated or corrupt (%zu bytes, its header implies %zu)", path, len, sizeof(h) + body + 8);
    uint64_t sum;
    memcpy(&sum, raw + len - 8, 8);
    if (sum != session_checksum(raw, len - 8)) die("%s is corrupt (its checksum does not match)", path);
    const uint8_t *tokens = raw + sizeof(h); // int32 each (read with memcpy: the bytes need not be aligned)
    for (uint32_t i = 0; i < h.n; i++) {
        int32_t t;
        memcpy(&t, tokens + 4 * i, 4);
        if (t < 0 || t >= p->vocab_size) die("%s is corrupt (token %d outside the vocabulary)", path, t);
    }
    int same = 0;
    for (int32_t t; same < (int)h.n && same < n && (memcpy(&t, tokens + 4 * same, 4), t == ids[same]);) same++;
    // with a window that wrapped, the ring holds the last positions only: all or nothing
    if (h.n > (uint32_t)s->kv_len && same < (int)h.n) same = 0;
    if (same > n - 1) same = n - 1;
    if (same <= 0) return 0;
    const uint8_t *at = raw + sizeof(h) + (size_t)h.n * 4;
    for (int kv = 0; kv < 2; kv++)
        for (int l = 0; l < p->n_layers; l++)
            for (int hh = 0; hh < p->n_kv_heads; hh++, at += rows * s->kv_row)
                memcpy(rows_of(kv ? s->values : s->keys, m, s, l, hh), at, rows * s->kv_row);
    memcpy(s->tokens, tokens, (size_t)same * 4);
    return same;
}

void session_save(const char *path, const Model *m, const State *s, int n, const char *const *inputs, int n_inputs) {
    const Config *p = &m->config;
    SessionHeader h = {SESSION_MAGIC, session_model_hash(m), (uint32_t)s->kv_type, (uint32_t)s->kv_len, (uint32_t)p->n_layers,
                       (uint32_t)p->n_kv_heads, (uint32_t)s->kv_row, (uint32_t)n};
    size_t rows = held_rows(s, (uint32_t)n);
    Output o;
    output_open(&o, path, inputs, n_inputs);
    uint64_t sum = session_checksum(&h, sizeof(h));
    output_write(&o, &h, sizeof(h), 1);
    sum = fnv1a(s->tokens, (size_t)n * 4, sum);
    output_write(&o, s->tokens, 4, (size_t)n);
    for (int kv = 0; kv < 2; kv++)
        for (int l = 0; l < p->n_layers; l++)
            for (int hh = 0; hh < p->n_kv_heads; hh++) {
                const uint8_t *r = rows_of(kv ? s->values : s->keys, m, s, l, hh);
                sum = fnv1a(r, rows * s->kv_row, sum);
                output_write(&o, r, s->kv_row, rows);
            }
    output_write(&o, &sum, 8, 1);
    output_close(&o);
}
