// Fuzz target: the model loader on any bytes, as a model file. A file that
// loads and is small enough then runs two tokens through the model and samples
// from the logits (NaN weights, absurd scales: the sampler must survive them).
#include "fuzz.h"

static int small_enough(const Config *p) {
    return (int64_t)p->dim * p->hidden_dim * p->n_experts * p->n_layers <= (1 << 16) && p->vocab_size <= 4096 &&
           (int64_t)p->n_heads * p->head_dim <= 4096 && p->n_layers <= 8;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < HEADER_SIZE || size > (64u << 20)) return 0;
    size_t cap = (size + 4095) / 4096 * 4096;
    uint8_t *buf = aligned_alloc(4096, cap); // a mapping is page-aligned: so is this copy
    memcpy(buf, data, size);
    static Model m;
    static State s;
    static ThreadPool pool;
    static int pooled, stated;
    memset(&m, 0, sizeof(m));
    if (!setjmp(die_jump)) {
        memcpy(&m.config, buf, sizeof(Config));
        model_check(&m.config, size, "fuzz");
        m.map = buf;
        m.map_size = size;
        model_attach(&m, "fuzz");
        const Config *p = &m.config;
        if (small_enough(p)) {
            pool_init(&pool, 1);
            pooled = 1;
            state_init(&s, p, 8, 4, KV_Q8, 0, &pool); // (the quantized KV cache: NaN and huge values too)
            stated = 1;
            int ids[2] = {p->bos_id, p->eos_id};
            forward_chunk(&m, &s, ids, 2, 0, 0);
            Sampler sm = {.temperature = 0.7f, .top_p = 0.9f, .top_k = 3, .min_p = 0.05f, .repeat_penalty = 1.3f,
                          .repeat_last_n = 4, .rng = 1};
            sampler_init(&sm, p->vocab_size);
            sampler_accept(&sm, ids[0]);
            int t = sample(&sm, s.logits, p->vocab_size);
            if (t < 0 || t >= p->vocab_size) abort();
            sampler_free(&sm);
        }
    }
    if (stated) state_free(&s, &m.config);
    if (pooled) pool_free(&pool);
    stated = pooled = 0;
    if (m.weights.layers) {
        for (int l = 0; l < m.config.n_layers; l++) free(m.weights.layers[l].experts);
        free(m.weights.layers);
    }
    tokenizer_free(&m.tokenizer);
    free(buf);
    return 0;
}
