// mixtral.c: inference for Mixtral sparse mixture-of-experts models, in plain C.
//
//   make && ./mixtral model.bin -i "Once upon a time"
//
// In the order a reader learns the model:
//   1. notation             the dimension letters; the structs are in mixtral.h
//   2. state and KV cache   activations, the KV cache (a ring buffer for a
//                           sliding window), and what the forward pass counts
//   3. forward pass         attention, then the mixture of experts: route()
//                           picks the experts, moe() runs them; forward_chunk()
//                           is the whole model, layer by layer, then the logits
//   4. the products         the matrix products as rounds of the thread pool
//   5. the model file       checking the header, reading the file in, and the
//                           expert cache for models larger than memory
//   6. sampler              repetition penalty, temperature, top-k, min-p, top-p
//   7. generation and chat  text in, text out; --expert-stats, --trace-experts
//   8. bench                --bench, --bench-depth
//   9. command line         main()
// tests/reference.py is the numpy twin of the forward pass, written from the
// same math (modeling_mixtral.py), that the tests compare this file against.
// Around it: the machine-specific kernels (AVX2, AVX-512, NEON) in kernels.c
// behind the contract in kernels.h; the thread pool in pool.c; the expert cache
// in expert_cache.c; perplexity, KL divergence and the test hooks in eval.c;
// Mistral's chat format and the conversation-file reader in chat.c; the
// tokenizer in tokenizer.c; die() and file helpers in util.c.
//
// Tokens go through the model in chunks (forward_chunk): a prompt many at a
// time, so that each expert's weights are read once per chunk, and decoding one
// at a time, which is the same code with a chunk of one.
//
// Names follow Hugging Face's modeling_mixtral.py and config.json so the two can
// be read side by side: dim = hidden_size, hidden_dim = intermediate_size,
// wq/wk/wv/wo = q/k/v/o_proj, gate = the router, w1/w2/w3 = an expert's matrices.
// Dimension letters: D = dim, H = hidden_dim, Q = n_heads*head_dim,
// KV = n_kv_heads*head_dim, E = n_experts, V = vocab_size, S = positions in the KV cache,
// C = tokens in a chunk, top_k = the experts each token is routed to
// (num_experts_per_tok). In a product, as in BLAS, M is the tokens, N the
// matrix's rows (outputs) and K its inner dimension (inputs).

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "eval.h"
#include "mixtral.h"
#include "session.h"

// ----------------------------------------------------------------------------
// 1. notation
//
// The structs (Config, Matrix, Expert, Layer, Weights, Model, State) are in
// mixtral.h, each array with its shape in the letters above.

const char *const weight_type_name[WEIGHT_NTYPES] = {"f32", "bf16", "q8", "q4", "q6", "q3", "q2"};
const char *const kind_name[N_KINDS] = {"embed", "wq", "wk", "wv", "wo", "w1", "w3", "w2", "lm_head"};
const char *const kv_type_name[KV_NTYPES] = {"f32", "bf16", "q8", "q4"};

// ----------------------------------------------------------------------------
// 2. state and KV cache
//
// Each layer keeps the keys and values of past positions in the KV cache, S
// positions long. Without a sliding window S is the context (-c) and position
// p lives at p. With a window W shorter than the context, S = W and position p
// lives at p % W: a ring buffer. The query at p needs keys p-W+1..p, exactly
// the W held, so the one being overwritten (p-W) is the one that just fell out
// of the window, and memory stays bounded by W however long the context. The slots of each kv
// head lie one after another, so that attention reads a head's keys (and
// values) as one sequential stream.

// The counting hooks: what --bench and --expert-stats report, gathered here so
// that the math below reads as math.
static void count_memory(State *s, uint64_t bytes) { s->counts.memory_bytes += bytes; }

// A product's input x (M, K) for --imatrix: the squares of each column, summed.
static void count_activations(State *s, const Matrix *W, const float *x, int M) {
    Imatrix *im = s->counts.imatrix;
    if (!im || !im->sum[W->id]) return;
    double *sum = im->sum[W->id];
    for (int m = 0; m < M; m++)
        for (int k = 0; k < W->cols; k++) sum[k] += (double)x[(size_t)m * W->cols + k] * x[(size_t)m * W->cols + k];
    im->tokens[W->id] += (uint64_t)M;
}

// One token's routing in layer l: the router's softmax probs (E,) and its choice.
static void count_routing(State *s, const Config *p, int l, const float *probs, const int *chosen) {
    Counters *c = &s->counts;
    for (int e = 0; e < p->n_experts; e++)
        if (probs[e] > 0) c->router_entropy[l] -= probs[e] * log2(probs[e]);
    for (int k = 0; k < p->n_experts_per_tok; k++) c->expert_count[(size_t)l * p->n_experts + chosen[k]]++;
}

static void clear_counts(const Config *p, State *s) {
    memset(s->counts.expert_count, 0, (size_t)p->n_layers * p->n_experts * sizeof(uint64_t));
    memset(s->counts.router_entropy, 0, (size_t)p->n_layers * sizeof(double));
    s->counts.tokens_routed = 0;
}

// The positions a run's KV cache holds at -c context (0: the default): the
// context, or the sliding window if shorter.
static int kv_len_of(const Config *p, int context) {
    if (!context) context = p->max_seq_len < 4096 ? p->max_seq_len : 4096;
    return p->sliding_window > 0 && p->sliding_window < context ? p->sliding_window : context;
}

// Its bytes, keys and values of every layer, in a KV_* type.
static uint64_t kv_cache_bytes(const Config *p, int context, int kv_type) {
    return 2 * (uint64_t)p->n_layers * kv_len_of(p, context) * p->n_kv_heads * kv_row_bytes(kv_type, p->head_dim);
}

// Positions a prompt attends together: ATT_POSITIONS, or the chunk if shorter.
static int att_positions(int chunk) { return chunk < ATT_POSITIONS ? chunk : ATT_POSITIONS; }

void state_init(State *s, const Config *p, int context, int chunk, int kv_type, int bf16_activations, ThreadPool *pool) {
    size_t D = p->dim, H = p->hidden_dim, top_k = p->n_experts_per_tok, E = p->n_experts, C = chunk;
    size_t Q = (size_t)p->n_heads * p->head_dim, KV = (size_t)p->n_kv_heads * p->head_dim;
    memset(s, 0, sizeof(*s));
    s->kv_type = kv_type;
    s->context = context;
    s->kv_len = kv_len_of(p, context);
    s->chunk = chunk;
    s->x = xcalloc(C * D, sizeof(float));
    s->xb = xcalloc(C * D, sizeof(float));
    s->xb2 = xcalloc(C * D, sizeof(float));
    s->q = xcalloc(C * Q, sizeof(float));
    s->k = xcalloc(C * KV, sizeof(float));
    s->v = xcalloc(C * KV, sizeof(float));
    s->att_out = xcalloc(C * Q, sizeof(float));
    size_t P = att_positions(chunk);
    s->att = xcalloc((size_t)p->n_heads * P * (s->kv_len + P - 1), sizeof(float));
    s->att_q = xcalloc((size_t)p->n_heads * P * p->head_dim, sizeof(float));
    s->att_o = xcalloc((size_t)p->n_heads * P * p->head_dim, sizeof(float));
    s->moe_in = xcalloc(C * top_k * D, sizeof(float));
    s->hb = xcalloc(C * top_k * H, sizeof(float));
    s->hb2 = xcalloc(C * top_k * H, sizeof(float));
    s->moe_out = xcalloc(C * top_k * D, sizeof(float));
    s->pair_token = xcalloc(C * top_k, sizeof(int));
    s->pair_weight = xcalloc(C * top_k, sizeof(float));
    s->router = xcalloc(E, sizeof(float));
    s->logits = xcalloc(C * p->vocab_size, sizeof(float));
    s->kv_row = kv_row_bytes(s->kv_type, p->head_dim);
    s->keys = xcalloc((size_t)p->n_layers * s->kv_len * p->n_kv_heads, s->kv_row);
    s->values = xcalloc((size_t)p->n_layers * s->kv_len * p->n_kv_heads, s->kv_row);
    s->chunk_keys = xcalloc(C * p->n_kv_heads, s->kv_row);
    s->tokens = xcalloc(context, sizeof(int));
    s->chunk_values = xcalloc(C * p->n_kv_heads, s->kv_row);
    s->chosen = xcalloc(C * p->n_layers * top_k, sizeof(int));
    s->chosen_w = xcalloc(C * p->n_layers * top_k, sizeof(float));
    s->counts.expert_count = xcalloc((size_t)p->n_layers * E, sizeof(uint64_t));
    s->counts.router_entropy = xcalloc(p->n_layers, sizeof(double));
    s->xq = xcalloc(E, sizeof(QuantInput));
    size_t widest = D > H ? D : H; // room for C tokens (an expert's most) of the widest input
    widest = widest > Q ? widest : Q;
    int bf16_matrices = 0;
    for (int kind = 0; kind < N_KINDS; kind++) bf16_matrices |= p->matrix_type[kind] == WEIGHT_BF16;
    s->bf16_activations = bf16_activations && bf16_matrices;
    for (size_t e = 0; e < E; e++) {
        if (p->block_size) { // q8/q6/q4 weights
            s->xq[e].qx.q = xcalloc(C * widest, 1);
            s->xq[e].qx.scale = xcalloc(C * widest / QBLOCK, sizeof(float));
            s->xq[e].qx.qoff = xcalloc(2 * C * widest / QBLOCK, sizeof(int32_t));
        }
        if (s->bf16_activations) s->xq[e].bf16 = xcalloc(C * widest, sizeof(uint16_t));
    }
    // modeling_mixtral.py: MixtralRotaryEmbedding, inv_freq = 1 / theta^(2i/head_dim), in fp32
    s->rope_inv_freq = xcalloc(p->head_dim / 2, sizeof(float));
    for (int i = 0; i < p->head_dim / 2; i++)
        s->rope_inv_freq[i] = 1.0f / powf(p->rope_theta, (float)(2 * i) / (float)p->head_dim);
    s->pool = pool;
}

void state_free(State *s, const Config *p) {
    float *bufs[] = {s->x, s->xb, s->xb2, s->q, s->k, s->v, s->att_out, s->att, s->att_q, s->att_o, s->moe_in, s->hb, s->hb2,
                     s->moe_out, s->pair_weight, s->router, s->logits, s->chosen_w, s->rope_inv_freq};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) free(bufs[i]);
    for (int e = 0; e < p->n_experts; e++) {
        free(s->xq[e].qx.q); free(s->xq[e].qx.scale); free(s->xq[e].qx.qoff); free(s->xq[e].bf16);
    }
    free(s->xq);
    free(s->keys);
    free(s->values);
    free(s->chunk_keys);
    free(s->chunk_values);
    free(s->tokens);
    free(s->chosen);
    free(s->pair_token);
    free(s->counts.expert_count);
    free(s->counts.router_entropy);
}

// ----------------------------------------------------------------------------
// 3. forward pass

// out (n,) = x (n,) / rms(x) * weight (n,); out may alias x.
// modeling_mixtral.py: MixtralRMSNorm.forward
static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

// e^x for x <= 0, the same bits on every CPU: x = n ln2 + r with |r| <= ln2/2,
// e^r by its Taylor series to r^6 (relative error under 2e-7), times 2^n
// built in the exponent's bits. Each step a statement of its own, so that no
// compiler fuses a multiply and an add on one CPU and not another. Below -86
// the result would leave the normal floats: 0, which changes no sum (and NaN: 0).
static inline float exp_nonpositive(float x) {
    int low = !(x >= -86.0f);      // NaN too
    x = low ? -86.0f : x;
    float n = x * 1.44269504f;
    n = n + 12582912.0f;           // 1.5 * 2^23: rounds n to the nearest integer
    n = n - 12582912.0f;
    float hi = n * 0.693145752f;   // ln 2 in two parts, the first exact in n's products
    float lo = n * 1.42860677e-6f;
    float r = x - hi;
    r = r - lo;
    float p = r * (1.0f / 720);
    p = p + (1.0f / 120);
    p = p * r; p = p + (1.0f / 24);
    p = p * r; p = p + (1.0f / 6);
    p = p * r; p = p + 0.5f;
    p = p * r; p = p + 1.0f;
    p = p * r; p = p + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return low ? 0.0f : p * scale;
}

// x[i] = e^((x[i] - max) * inverse_t), every x[i] <= max, in LANES running
// sums: lane[j] is the sum of x[j], x[j + 16], x[j + 32], ... (so that the loop
// is vector code, and its sum the same on every CPU).
enum { LANES = 16 };
static void exp_lanes(float *x, int n, float max, float inverse_t, float lane[LANES]) {
    int i = 0;
    for (int j = 0; j < LANES; j++) lane[j] = 0.0f;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            x[i + j] = exp_nonpositive((x[i + j] - max) * inverse_t);
            lane[j] += x[i + j];
        }
    for (int j = 0; i < n; i++, j++) { x[i] = exp_nonpositive((x[i] - max) * inverse_t); lane[j] += x[i]; }
}

// In-place softmax of x (n,), in fp32 like the reference: e^(x - max) by
// exp_nonpositive, in 16 lanes (vector code; the attention's softmax runs over
// every key in view, for every query head).
static void softmax(float *x, int n) {
    float max = x[0], lane[LANES];
    int i = 0;
    if (n >= LANES) {
        for (int j = 0; j < LANES; j++) lane[j] = x[j];
        for (i = LANES; i + LANES <= n; i += LANES)
            for (int j = 0; j < LANES; j++) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
        for (int j = 0; j < LANES; j++) max = lane[j] > max ? lane[j] : max;
    }
    for (; i < n; i++) max = x[i] > max ? x[i] : max;
    exp_lanes(x, n, max, 1.0f, lane);
    float sum = 0.0f;
    for (int j = 0; j < LANES; j++) sum += lane[j];
    float inv = 1.0f / sum;
    for (i = 0; i < n; i++) x[i] *= inv;
}

// One product of a batch, a small GEMM: out (M, N) = x (M, K) @ W (N, K)^T,
// for the M tokens at once (1 when decoding; for a chunk of prompt the chunk's
// tokens, or an expert's share of them). Each weight row is fetched from
// memory once and used for all M tokens while it sits in the CPU's cache.
typedef struct {
    float *out;             // (M, N)
    const float *x;         // (M, K)
    const Matrix *W;        // (N, K)
    int M;
    const QuantInput *xq;   // x quantized, for q8/q6/q4 weights (set by matmul)
} Gemm;

// A batch of products in one round of the pool: g[i].out = g[i].x @ g[i].W^T
// (section 4).
static void matmul(State *s, Gemm *g, int n);

// --- attention ----------------------------------------------------------------

// Rotary position embedding, Hugging Face layout: dimension j of a head is
// rotated together with dimension j + head_dim/2 (rotate_half), by the angle
// pos * inv_freq[j]. vec is (n_heads, head_dim).
// modeling_mixtral.py: apply_rotary_pos_emb
static void rope(float *vec, int n_heads, int head_dim, int pos, const float *inv_freq) {
    int half = head_dim / 2;
    for (int j = 0; j < half; j++) {
        float angle = (float)pos * inv_freq[j]; // fp32 product, as the reference computes it
        float c = cosf(angle), s = sinf(angle);
        for (int h = 0; h < n_heads; h++) {
            float *v = vec + h * head_dim;
            float a = v[j], b = v[j + half];
            v[j] = a * c - b * s;
            v[j + half] = b * c + a * s;
        }
    }
}

typedef struct {
    const Config *p;
    State *s;
    const uint8_t *kc, *vc; // this layer's KV cache: keys, values (n_kv_heads, S) rows
    int pos0, n;            // the chunk: positions pos0 .. pos0+n-1
} AttentionJob;

// Evenly spaced rows of the KV cache's layer or of the chunk's rows: n rows,
// row t at byte at + t stride of the one that `chunk` says (keys and values
// have the same runs, each in its own buffers).
typedef struct {
    size_t at, stride;
    int n, chunk;
} KvRun;

static inline const uint8_t *run_rows(const KvRun *r, const uint8_t *held, const uint8_t *chunk) {
    return (r->chunk ? chunk : held) + r->at;
}

// The keys (or values) of positions first..pos of kv head kvh, in order, as at
// most three runs: in the KV cache, from first's slot to the ring's end and on
// from its start where the positions wrap around it (t is at slot t % S), then
// the chunk's own rows (C, n_kv_heads) for the positions in the chunk.
static int kv_runs(const AttentionJob *j, int kvh, int first, int pos, KvRun runs[3]) {
    size_t row = j->s->kv_row;
    int S = j->s->kv_len, n = 0, last_held = pos < j->pos0 ? pos : j->pos0 - 1;
    for (int t = first; t <= last_held;) {
        int at = t % S, len = last_held - t + 1 < S - at ? last_held - t + 1 : S - at;
        runs[n++] = (KvRun){((size_t)kvh * S + at) * row, row, len, 0};
        t += len;
    }
    int t0 = first > j->pos0 ? first : j->pos0;
    if (t0 <= pos) runs[n++] = (KvRun){((size_t)(t0 - j->pos0) * j->p->n_kv_heads + kvh) * row, (size_t)j->p->n_kv_heads * row, pos - t0 + 1, 1};
    return n;
}

// The first position the query at pos sees: the last W with a window, else 0.
static int window_first(const Config *p, int pos) {
    return p->sliding_window > 0 && pos - p->sliding_window + 1 > 0 ? pos - p->sliding_window + 1 : 0;
}

// Scaled dot-product attention for a share of the kv heads, for every query
// of the chunk. Query head h reads kv head h / (n_heads / n_kv_heads): grouped-
// query attention (repeat_kv). A worker takes whole kv heads and runs all their
// query heads together (kv_scores, kv_mix), so that each key and value is read
// and decoded once per query, not once per query head; in a prompt, once per
// block of ATT_POSITIONS positions. A block's earlier positions get scores for
// the later ones' keys too, which their softmax leaves out and weighs 0.
// Keys before the chunk come from the KV cache, the chunk's own from its rows
// (s->chunk_keys, s->chunk_values): stored in the same type, so that a prompt in
// chunks reads the same numbers as token by token.
static void attention_job(void *arg, int tid, int nthreads) {
    AttentionJob *j = arg;
    const Config *p = j->p;
    State *s = j->s;
    int hd = p->head_dim, Q = p->n_heads * hd, group = p->n_heads / p->n_kv_heads, S = s->kv_len;
    int P = att_positions(s->chunk);
    size_t ld = (size_t)S + P - 1; // (with a window, a block sees up to P - 1 keys more than a position)
    float scale = 1.0f / sqrtf((float)hd);
    int g0, g1;
    split_range(p->n_kv_heads, tid, nthreads, &g0, &g1);
    for (int kvh = g0; kvh < g1; kvh++) {
        int h0 = kvh * group; // its query heads: h0 .. h0 + group - 1
        float *att = s->att + (size_t)kvh * P * group * ld; // (np * group, ld): the scores of key first + t
        for (int i0 = 0; i0 < j->n; i0 += P) {
            int np = j->n - i0 < P ? j->n - i0 : P, g = np * group; // positions, queries
            int first = window_first(p, j->pos0 + i0), last = j->pos0 + i0 + np - 1;
            const float *q = s->q + (size_t)i0 * Q + (size_t)h0 * hd; // (g, hd): each position's group, in turn
            float *out = s->att_out + (size_t)i0 * Q + (size_t)h0 * hd;
            if (np > 1) {
                float *qb = s->att_q + (size_t)kvh * P * group * hd;
                for (int i = 0; i < np; i++)
                    memcpy(qb + (size_t)i * group * hd, q + (size_t)i * Q, (size_t)group * hd * sizeof(float));
                q = qb;
                out = s->att_o + (size_t)kvh * P * group * hd;
            }
            KvRun runs[3];
            int nruns = kv_runs(j, kvh, first, last, runs);
            for (int r = 0, t = 0; r < nruns; t += runs[r++].n)
                kv_scores(s->kv_type, q, g, run_rows(&runs[r], j->kc, s->chunk_keys), runs[r].stride, runs[r].n, hd, scale, att + t, ld);
            for (int i = 0; i < np; i++) {
                int pos = j->pos0 + i0 + i, from = window_first(p, pos) - first, to = pos - first + 1;
                for (int r = 0; r < group; r++) { // keys from..to-1 in view, the others weighed 0
                    float *a = att + (size_t)(i * group + r) * ld;
                    memset(a, 0, (size_t)from * sizeof(float));
                    softmax(a + from, to - from);
                    memset(a + to, 0, (size_t)(last - first + 1 - to) * sizeof(float));
                }
            }
            memset(out, 0, (size_t)g * hd * sizeof(float));
            for (int r = 0, t = 0; r < nruns; t += runs[r++].n) // out (g, hd) = att @ values
                kv_mix(s->kv_type, att + t, ld, g, run_rows(&runs[r], j->vc, s->chunk_values), runs[r].stride, runs[r].n, hd, out);
            if (np > 1)
                for (int i = 0; i < np; i++)
                    memcpy(s->att_out + (size_t)(i0 + i) * Q + (size_t)h0 * hd, out + (size_t)i * group * hd,
                           (size_t)group * hd * sizeof(float));
        }
    }
}

// Self-attention of one layer for the chunk; adds its output to x.
// modeling_mixtral.py: MixtralAttention.forward
static void attention(const Config *p, const Layer *L, State *s, int l, int pos0, int n) {
    int D = p->dim, Q = p->n_heads * p->head_dim, hd = p->head_dim, KV = p->n_kv_heads * hd, S = s->kv_len;
    size_t row = s->kv_row, layer_rows = (size_t)p->n_kv_heads * S;
    uint8_t *kc = s->keys + (size_t)l * layer_rows * row, *vc = s->values + (size_t)l * layer_rows * row;

    for (int i = 0; i < n; i++) rmsnorm(s->xb + (size_t)i * D, s->x + (size_t)i * D, L->attn_norm, D, p->rms_norm_eps);
    Gemm qkv[3] = {{s->q, s->xb, &L->wq, n, NULL}, {s->k, s->xb, &L->wk, n, NULL}, {s->v, s->xb, &L->wv, n, NULL}};
    matmul(s, qkv, 3); // q, k, v projections
    for (int i = 0; i < n; i++) {
        rope(s->q + (size_t)i * Q, p->n_heads, p->head_dim, pos0 + i, s->rope_inv_freq);
        rope(s->k + (size_t)i * KV, p->n_kv_heads, p->head_dim, pos0 + i, s->rope_inv_freq);
    }

    // The chunk's keys and values as KV-cache rows. A quantized cache holds
    // them rotated (kv_rotate: the same orthonormal H for queries and keys
    // keeps q.k, and spreads a head's outliers over its row before rounding);
    // the output, a sum of rotated values, is rotated back below.
    int rotated = s->kv_type == KV_Q8 || s->kv_type == KV_Q4;
    for (int i = 0; i < n; i++)
        for (int h = 0; h < p->n_kv_heads; h++) {
            float *k = s->k + (size_t)i * KV + h * hd, *v = s->v + (size_t)i * KV + h * hd;
            if (rotated) { kv_rotate(k, hd); kv_rotate(v, hd); }
            kv_store(s->kv_type, k, s->chunk_keys + ((size_t)i * p->n_kv_heads + h) * row, hd);
            kv_store(s->kv_type, v, s->chunk_values + ((size_t)i * p->n_kv_heads + h) * row, hd);
        }
    if (rotated)
        for (int i = 0; i < n * p->n_heads; i++) kv_rotate(s->q + (size_t)i * hd, hd);

    AttentionJob job = {p, s, kc, vc, pos0, n};
    pool_run(s->pool, attention_job, &job);
    if (rotated)
        for (int i = 0; i < n * p->n_heads; i++) kv_rotate(s->att_out + (size_t)i * hd, hd);
    // Only now do the chunk's keys and values join the KV cache: with a window,
    // a chunk longer than one step would otherwise overwrite keys its own
    // earlier queries still need. Position t goes to t % S (the ring).
    for (int i = 0; i < n; i++) {
        size_t at = (size_t)((pos0 + i) % S);
        for (int h = 0; h < p->n_kv_heads; h++) {
            memcpy(kc + ((size_t)h * S + at) * row, s->chunk_keys + ((size_t)i * p->n_kv_heads + h) * row, row);
            memcpy(vc + ((size_t)h * S + at) * row, s->chunk_values + ((size_t)i * p->n_kv_heads + h) * row, row);
        }
        int seen = pos0 + i + 1 < S ? pos0 + i + 1 : S;
        count_memory(s, (uint64_t)2 * seen * p->n_kv_heads * row);
    }
    Gemm o = {s->xb2, s->att_out, &L->wo, n, NULL};
    matmul(s, &o, 1); // o_proj
    for (size_t i = 0; i < (size_t)n * D; i++) s->x[i] += s->xb2[i]; // residual
}

// --- the mixture of experts ----------------------------------------------------

// The router's decision for one token, given its router logits (E,) (step 1,
// gate @ x, made by the caller): the top_k experts and their weights.
// modeling_mixtral.py: MixtralSparseMoeBlock.forward. `probs` (E,) receives the
// softmax over all experts (the caller's statistics read it).
static void route(const float *logits, int E, int top_k, float *probs, int *chosen, float *weight) {
    // 2. top-k of the softmax over all experts. Softmax is monotonic, so these
    //    are the k largest logits. Ties go to the lower expert index.
    memcpy(probs, logits, E * sizeof(float));
    softmax(probs, E);
    for (int k = 0; k < top_k; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < k; i++) taken |= chosen[i] == e;
            if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
        }
        chosen[k] = best;
        weight[k] = probs[best];
    }
    // 3. weights: divide the chosen probabilities by their sum. The softmax's
    //    normaliser cancels, so this equals a softmax over just the chosen logits.
    float sum = 0.0f;
    for (int k = 0; k < top_k; k++) sum += weight[k];
    for (int k = 0; k < top_k; k++) weight[k] /= sum;
}

// h = silu(h) * h2, elementwise (swiglu): the gate of the experts' hidden
// layer, in equal shares on the pool.
typedef struct { float *h; const float *h2; int64_t n; } SwiGLU;

static void swiglu_job(void *arg, int tid, int nthreads) {
    const SwiGLU *a = arg;
    int64_t i0 = a->n * tid / nthreads / 8 * 8, i1 = tid + 1 == nthreads ? a->n : a->n * (tid + 1) / nthreads / 8 * 8;
    swiglu(a->h + i0, a->h2 + i0, i1 - i0); // (shares are whole vectors: the same result on any number of threads)
}

// The experts the next layer's router would pick for the chunk's tokens from
// their residual stream as it is now (before this layer's experts add to it):
// what the expert cache reads ahead. Returns how many, into es (E,).
static int guess_experts(const Config *p, const Layer *next, State *s, int n, int *es) {
    int D = p->dim, E = p->n_experts, top_k = p->n_experts_per_tok, pick[top_k], want[E], k = 0;
    float logits[E], probs[E], w[top_k];
    memset(want, 0, sizeof(want));
    float *xn = s->xb2; // free here: the attention output is in x already
    for (int i = 0; i < n; i++) {
        rmsnorm(xn, s->x + (size_t)i * D, next->ffn_norm, D, p->rms_norm_eps);
        for (int e = 0; e < E; e++) logits[e] = dot_f32(next->gate + (size_t)e * D, xn, D);
        route(logits, E, top_k, probs, pick, w);
        for (int j = 0; j < top_k; j++) want[pick[j]] = 1;
    }
    for (int e = 0; e < E; e++) if (want[e]) es[k++] = e;
    return k;
}

// With the expert cache: experts es[0..n) of layer l read into its slots (as
// many as fit, a prefix: expert_cache_acquire), each's matrices moved from the
// file's span to where the span now lies. Returns how many.
static int acquire_experts(ExpertCache *c, const Layer *L, int l, const int *es, int n, Expert *out, const int *ahead,
                           int n_ahead) {
    const uint8_t *at[n];
    int got = expert_cache_acquire(c, l, es, n, at, ahead, n_ahead);
    for (int i = 0; i < got; i++) {
        const Expert *ex = &L->experts[es[i]];
        const uint8_t *span = (const uint8_t *)ex->w1.data;
        out[i] = *ex;
        out[i].w1.data = at[i];
        out[i].w3.data = at[i] + ((const uint8_t *)ex->w3.data - span);
        out[i].w2.data = at[i] + ((const uint8_t *)ex->w2.data - span);
    }
    return got;
}

// With the expert cache the embedding is not kept in memory: a token's row is
// read from the file (for q8/q6/q4, the group of 16 interleaved rows that holds it).
static void embed_row_from_file(const Model *m, int row, float *out) {
    const Matrix *embed = &m->weights.embed;
    int K = embed->cols, quant = weight_is_quant(embed->type);
    uint64_t bytes = quant ? quant_group_bytes(embed->type, K) : (uint64_t)K * (embed->type == WEIGHT_F32 ? 4 : 2);
    uint64_t at = (uint64_t)(quant ? row / QROWS : row) * bytes;
    uint8_t *buf = xcalloc(bytes, 1);
    expert_cache_read(m->expert_cache, (uint64_t)((const uint8_t *)embed->data - m->map) + at, bytes, buf);
    dequant_row(embed->type, buf, K, quant ? row % QROWS : 0, out);
    free(buf);
}

// The mixture of experts of one layer for the chunk; adds its output to x.
// modeling_mixtral.py: MixtralSparseMoeBlock.forward. For each token: 1. the
// router's logits, 2. the top_k experts, 3. their weights (route()). Then 4,
// the expert loop, runs each chosen expert once over all the tokens that
// chose it: out = sum_k weight_k * w2(silu(w1 xb) * w3 xb).
static void moe(const Config *p, const Layer *L, const Layer *next, State *s, int l, int n) {
    int D = p->dim, H = p->hidden_dim, E = p->n_experts, top_k = p->n_experts_per_tok, NL = p->n_layers;
    count_memory(s, (uint64_t)n * E * D * sizeof(float)); // the router
    int count[E], start[E + 1], fill[E];
    float logits[E];
    memset(count, 0, sizeof(count));
    for (int i = 0; i < n; i++) {
        float *xb = s->xb + (size_t)i * D;
        int *chosen = s->chosen + ((size_t)i * NL + l) * top_k;
        rmsnorm(xb, s->x + (size_t)i * D, L->ffn_norm, D, p->rms_norm_eps);
        // 1. router logits = gate @ xb, (E, D) @ (D,) -> (E,), always in f32
        for (int e = 0; e < E; e++) logits[e] = dot_f32(L->gate + (size_t)e * D, xb, D);
        // 2, 3. top-k and weights
        route(logits, E, top_k, s->router, chosen, s->chosen_w + ((size_t)i * NL + l) * top_k);
        for (int k = 0; k < top_k; k++) count[chosen[k]]++;
        count_routing(s, p, l, s->router, chosen);
    }
    // Sort the (token, expert) pairs by expert (a counting sort) and gather inputs.
    start[0] = 0;
    for (int e = 0; e < E; e++) { start[e + 1] = start[e] + count[e]; fill[e] = start[e]; }
    for (int i = 0; i < n; i++)
        for (int k = 0; k < top_k; k++) {
            size_t at = ((size_t)i * NL + l) * top_k + k;
            int j = fill[s->chosen[at]]++;
            s->pair_token[j] = i;
            s->pair_weight[j] = s->chosen_w[at];
            memcpy(s->moe_in + (size_t)j * D, s->xb + (size_t)i * D, D * sizeof(float));
        }
    // 4. every expert that was chosen runs once over its rows: all up projections
    //    (w1, w3) in one round of the pool, all down projections (w2) in the next.
    //    With the expert cache, the chosen experts are read in first (and the
    //    next layer's guessed ones read ahead), in waves if they outnumber its slots.
    int used[E], n_used = 0, guess[E], n_guess = 0;
    for (int e = 0; e < E; e++) if (count[e]) used[n_used++] = e;
    if (s->expert_cache && next) n_guess = guess_experts(p, next, s, n, guess);
    Expert cached[E];
    for (int a = 0; a < n_used;) {
        int k = s->expert_cache ? acquire_experts(s->expert_cache, L, l, used + a, n_used - a, cached, guess, n_guess)
                                : n_used - a;
        n_guess = 0; // read ahead once
        Gemm up[2 * E], down[E];
        for (int i = 0; i < k; i++) {
            int e = used[a + i];
            const Expert *ex = s->expert_cache ? &cached[i] : &L->experts[e];
            size_t j = start[e];
            up[2 * i] = (Gemm){s->hb + j * H, s->moe_in + j * D, &ex->w1, count[e], NULL};
            up[2 * i + 1] = (Gemm){s->hb2 + j * H, s->moe_in + j * D, &ex->w3, count[e], NULL};
            down[i] = (Gemm){s->moe_out + j * D, s->hb + j * H, &ex->w2, count[e], NULL};
        }
        matmul(s, up, 2 * k);
        size_t r0 = start[used[a]], r1 = start[used[a + k - 1] + 1]; // the wave's rows: consecutive experts
        SwiGLU act = {s->hb + r0 * H, s->hb2 + r0 * H, (int64_t)(r1 - r0) * H};
        pool_run(s->pool, swiglu_job, &act);
        matmul(s, down, k);
        if (s->expert_cache) expert_cache_release(s->expert_cache, l, used + a, k);
        a += k;
    }
    for (int j = 0; j < n * top_k; j++) { // weighted sum into the residual, expert by expert
        float *x = s->x + (size_t)s->pair_token[j] * D, w = s->pair_weight[j];
        const float *y = s->moe_out + (size_t)j * D;
        for (int i = 0; i < D; i++) x[i] += w * y[i];
    }
}

// Runs n tokens, at positions pos0 .. pos0+n-1, through the model. Returns the
// logits: (n, V) with all_logits, else (1, V) for the last token only.
// modeling_mixtral.py: MixtralForCausalLM.forward, for a chunk of new tokens.
float *forward_chunk(Model *m, State *s, const int *ids, int n, int pos0, int all_logits) {
    const Config *p = &m->config;
    int D = p->dim;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= p->vocab_size)
            die("token id %d is outside the vocabulary 0..%d", ids[i], p->vocab_size - 1);
        const Matrix *embed = &m->weights.embed; // embed_tokens: one row of (V, D)
        if (m->expert_cache) embed_row_from_file(m, ids[i], s->x + (size_t)i * D);
        else dequant_row(embed->type, embed->data, D, ids[i], s->x + (size_t)i * D);
    }
    if (pos0 < 0 || pos0 > s->context - n)
        die("position %d is past the context of %d tokens; use a larger -c", pos0 + n - 1, s->context);
    memcpy(s->tokens + pos0, ids, n * sizeof(int));
    for (int l = 0; l < p->n_layers; l++) {
        attention(p, &m->weights.layers[l], s, l, pos0, n);
        moe(p, &m->weights.layers[l], l + 1 < p->n_layers ? &m->weights.layers[l + 1] : NULL, s, l, n);
    }
    s->counts.tokens_routed += n;
    int first = all_logits ? 0 : n - 1;
    for (int i = first; i < n; i++) rmsnorm(s->x + (size_t)i * D, s->x + (size_t)i * D, m->weights.norm, D, p->rms_norm_eps);
    Gemm head = {s->logits, s->x + (size_t)first * D, &m->weights.lm_head, n - first, NULL};
    matmul(s, &head, 1);
    return s->logits;
}

// One token at position pos: decoding is a chunk of one.
static float *forward(Model *m, State *s, int token, int pos) {
    return forward_chunk(m, s, &token, 1, pos, 0);
}

// ----------------------------------------------------------------------------
// 4. the products
//
// Nearly all the time of a token goes to products with weight matrices, which
// read every active weight once. They run in batches: all products that do not
// depend on each other (q, k and v; the up projections of every chosen expert)
// in one round of the pool. The kernels themselves are in kernels.c.

// Rows [r0, r1) of one product (r0 a multiple of QROWS): the one place weight
// formats are dispatched. q8/q6/q4 rows come in groups of QROWS, which the kernel
// takes whole; float rows are dot products, row by row.
static void gemm_rows(const Gemm *g, int r0, int r1) {
    const Matrix *W = g->W;
    int K = W->cols, N = W->rows;
    const uint8_t *w = (const uint8_t *)W->data;
    if (weight_is_quant(W->type)) {
        w += (size_t)(r0 / QROWS) * quant_group_bytes(W->type, K);
        gemm_quant(W->type, w, K, r1 - r0, &g->xq->qx, g->M, g->out + r0, N);
        return;
    }
    if (W->type == WEIGHT_BF16) {
        if (g->xq) gemm_bf16x((const uint16_t *)w + (size_t)r0 * K, K, r1 - r0, g->xq->bf16, g->M, g->out + r0, N);
        else gemm_bf16((const uint16_t *)w + (size_t)r0 * K, K, r1 - r0, g->x, g->M, g->out + r0, N);
        return;
    }
    size_t row_bytes = (size_t)K * 4;
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = w + r * row_bytes;
        for (int m = 0; m < g->M; m++) {
            const float *x = g->x + (size_t)m * K;
            float *out = g->out + (size_t)m * N + r;
            *out = dot_f32((const float *)row, x, K);
        }
    }
}

// A batch of products as one job of the pool. Its work is counted in units:
// a tile of QROWS rows of an M-token product counts M units, the products'
// tiles stacked.
typedef struct {
    const Gemm *gemm;
    int n;              // products in the batch
    int64_t total_work; // units
    int decode;         // one token: shares with stealing (pool_share); else pieces
    int pieces;         // not decoding: the work is cut into this many equal pieces,
    atomic_int next;    //   each taken by the next free worker
    ThreadPool *pool;
} MatmulJob;

static int64_t row_tiles(const Matrix *W) { return (W->rows + QROWS - 1) / QROWS; }

// Units [lo, hi) of a batch's work: each product gets the tiles whose first
// unit falls in [lo, hi).
static void matmul_range(const MatmulJob *j, int64_t lo, int64_t hi) {
    int64_t base = 0;
    for (int i = 0; i < j->n; i++) {
        const Gemm *g = &j->gemm[i];
        int64_t tiles = row_tiles(g->W), M = g->M;
        int64_t t0 = lo <= base ? 0 : (lo - base + M - 1) / M, t1 = hi <= base ? 0 : (hi - base + M - 1) / M;
        if (t0 > tiles) t0 = tiles;
        if (t1 > tiles) t1 = tiles;
        if (t0 < t1) gemm_rows(g, (int)(t0 * QROWS), (int)(t1 * QROWS < g->W->rows ? t1 * QROWS : g->W->rows));
        base += tiles * M;
    }
}

// Decoding (one token) is bound by memory: tiles are shared out with stealing
// (pool_share), so that each worker streams through one contiguous range of
// the weights, which memory serves best. Batches are bound by arithmetic
// instead, and their work is cut into more pieces than workers, each taking
// the next free piece. Which worker computes a row never changes its result.
static void matmul_job(void *arg, int tid, int nthreads) {
    (void)nthreads;
    MatmulJob *j = arg;
    if (j->decode) {
        for (int64_t b; (b = pool_next_block(j->pool, tid)) >= 0;) matmul_range(j, b, b + 1);
        return;
    }
    for (int c; (c = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed)) < j->pieces;)
        matmul_range(j, j->total_work * c / j->pieces, j->total_work * (c + 1) / j->pieces);
}

// Quantizes the inputs xq[0..n) (each xq[i].x, xq[i].blocks), cut into equal
// shares of blocks.
typedef struct { QuantInput *xq; int n; int64_t total; } QuantizeJob;

static void quantize_job(void *arg, int tid, int nthreads) {
    const QuantizeJob *j = arg;
    int64_t lo = j->total * tid / nthreads, hi = j->total * (tid + 1) / nthreads, base = 0;
    for (int i = 0; i < j->n; base += j->xq[i++].blocks) {
        int64_t b0 = lo > base ? lo - base : 0, b1 = hi - base < j->xq[i].blocks ? hi - base : j->xq[i].blocks;
        if (b0 >= b1) continue;
        if (j->xq[i].int8) quantize_blocks(&j->xq[i].qx, j->xq[i].x, b0, b1);
        if (j->xq[i].to_bf16) { // (the last block may be short)
            int64_t end = b1 * QBLOCK < j->xq[i].values ? b1 * QBLOCK : j->xq[i].values;
            to_bf16(j->xq[i].x + b0 * QBLOCK, j->xq[i].bf16 + b0 * QBLOCK, end - b0 * QBLOCK);
        }
    }
}

// Inputs of quantized matrices are quantized first (on the pool too), once
// per distinct input (products sharing an input come together in the batch).
static void matmul(State *s, Gemm *g, int n) {
    int64_t work = 0;
    int tokens = 0;
    QuantizeJob qj = {s->xq, 0, 0};
    for (int i = 0; i < n; i++) {
        const Matrix *W = g[i].W;
        work += row_tiles(W) * g[i].M;
        if (g[i].M > tokens) tokens = g[i].M;
        count_memory(s, W->bytes);
        count_activations(s, W, g[i].x, g[i].M);
        int int8 = weight_is_quant(W->type), to_bf16 = W->type == WEIGHT_BF16 && s->bf16_activations;
        g[i].xq = NULL;
        if (!int8 && !to_bf16) continue;
        if (qj.n == 0 || s->xq[qj.n - 1].x != g[i].x) {
            QuantInput *in = &s->xq[qj.n++];
            in->x = g[i].x;
            in->values = (int64_t)g[i].M * W->cols;
            in->blocks = (in->values + QBLOCK - 1) / QBLOCK;
            in->int8 = in->to_bf16 = 0;
            qj.total += in->blocks;
        }
        QuantInput *xq = &s->xq[qj.n - 1];
        xq->int8 |= int8;
        xq->to_bf16 |= to_bf16;
        g[i].xq = xq;
    }
    if (qj.total) pool_run(s->pool, quantize_job, &qj);
    MatmulJob job = {g, n, work, tokens == 1, 8 * s->pool->n, 0, s->pool};
    if (job.decode) pool_share(s->pool, work);
    pool_run(s->pool, matmul_job, &job);
}

// ----------------------------------------------------------------------------
// 5. the model file
//
// The layout is in mixtral.h (and export.py, which writes it).

// Walks the tensor order once, from the header's dimensions: each tensor at
// the next TENSOR_ALIGN boundary. With w, points w's weights into the file
// mapped at map; without, only measures. Returns the offset just past the
// last tensor (the file size the header implies), or UINT64_MAX when the
// arithmetic would overflow (a corrupt header cannot wrap it).
typedef struct {
    const uint8_t *map;
    uint64_t off;
    int overflow;
    int matrices;   // matrices walked so far: the next one's id
} Cursor;

static const void *cursor_take(Cursor *c, uint64_t bytes) {
    uint64_t start = round_up(c->off, TENSOR_ALIGN);
    if (start < c->off || start + bytes < start) { c->overflow = 1; return NULL; }
    c->off = start + bytes;
    return c->map ? c->map + start : NULL;
}

static Matrix cursor_matrix(Cursor *c, int type, int rows, int cols) {
    Matrix m = {NULL, type, rows, cols, weight_matrix_bytes(type, rows, cols), c->matrices++};
    m.data = cursor_take(c, m.bytes);
    return m;
}

static const float *cursor_f32(Cursor *c, uint64_t n) {
    return (const float *)cursor_take(c, n * 4);
}

static uint64_t walk_tensors(const Config *p, Weights *w, const uint8_t *map) {
    Cursor c = {map, p->weights_offset, 0, 0};
    const uint8_t *t = p->matrix_type;
    int D = p->dim, H = p->hidden_dim, E = p->n_experts;
    int Q = p->n_heads * p->head_dim, KV = p->n_kv_heads * p->head_dim;
    Weights none; // where a walk that only measures puts what it finds
    Layer none_layer;
    Expert none_expert;
    if (!w) w = &none;
    w->embed = cursor_matrix(&c, t[KIND_EMBED], p->vocab_size, D);
    for (int l = 0; l < p->n_layers; l++) {
        Layer *L = w == &none ? &none_layer : &w->layers[l];
        L->attn_norm = cursor_f32(&c, D);
        L->wq = cursor_matrix(&c, t[KIND_WQ], Q, D);
        L->wk = cursor_matrix(&c, t[KIND_WK], KV, D);
        L->wv = cursor_matrix(&c, t[KIND_WV], KV, D);
        L->wo = cursor_matrix(&c, t[KIND_WO], D, Q);
        L->ffn_norm = cursor_f32(&c, D);
        L->gate = cursor_f32(&c, (uint64_t)E * D);
        for (int e = 0; e < E; e++) {
            Expert *X = w == &none ? &none_expert : &L->experts[e];
            X->w1 = cursor_matrix(&c, t[KIND_W1], H, D);
            X->w3 = cursor_matrix(&c, t[KIND_W3], H, D);
            X->w2 = cursor_matrix(&c, t[KIND_W2], D, H);
        }
    }
    w->norm = cursor_f32(&c, D);
    w->lm_head = cursor_matrix(&c, t[KIND_LM_HEAD], p->vocab_size, D);
    return c.overflow ? UINT64_MAX : c.off;
}

// The matrices in the order walk_tensors numbers them: the embedding, per layer
// wq wk wv wo and each expert's w1 w3 w2, then lm_head.
int matrix_count(const Config *p) { return 2 + p->n_layers * (4 + 3 * p->n_experts); }

void matrix_name(const Config *p, int id, char *out, size_t size) {
    static const char *attn[] = {"q_proj", "k_proj", "v_proj", "o_proj"}, *expert[] = {"w1", "w3", "w2"};
    int per_layer = 4 + 3 * p->n_experts, l = (id - 1) / per_layer, j = (id - 1) % per_layer;
    if (id == 0) snprintf(out, size, "model.embed_tokens.weight");
    else if (id == matrix_count(p) - 1) snprintf(out, size, "lm_head.weight");
    else if (j < 4) snprintf(out, size, "model.layers.%d.self_attn.%s.weight", l, attn[j]);
    else snprintf(out, size, "model.layers.%d.block_sparse_moe.experts.%d.%s.weight", l, (j - 4) / 3, expert[(j - 4) % 3]);
}

// The size of the file the header describes (UINT64_MAX: it overflows).
static uint64_t implied_file_size(const Config *p) { return walk_tensors(p, NULL, NULL); }

// Checks everything the engine will rely on before any pointer is formed.
static void config_validate(const Config *p, uint64_t file_size, const char *path) {
    const char *hint = "re-run export.py to make a new file";
    if (memcmp(p->magic, MODEL_MAGIC, 8) != 0)
        die("%s is not a mixtral.c model file (bad magic); make one with export.py", path);
    if (p->version != MODEL_VERSION)
        die("%s has format version %u, this build reads version %d; %s", path, p->version,
            MODEL_VERSION, p->version > MODEL_VERSION ? "update mixtral.c or re-run its export.py" : hint);
    if (p->header_size != HEADER_SIZE) die("%s: header size %u, expected %d; %s", path, p->header_size, HEADER_SIZE, hint);
    if (p->weight_type >= WEIGHT_NTYPES) die("%s: unknown weight type %u; %s", path, p->weight_type, hint);
    int quantized = 0;
    for (int k = 0; k < N_KINDS; k++) {
        if (p->matrix_type[k] >= WEIGHT_NTYPES)
            die("%s: corrupt header: unknown weight type %u for %s; %s", path, p->matrix_type[k], kind_name[k], hint);
        quantized |= weight_is_quant(p->matrix_type[k]);
    }
    if (quantized ? p->block_size != QBLOCK || p->row_group != QROWS : p->block_size != 0 || p->row_group != 0)
        die("%s: corrupt header: block size %u, row group %d (this build reads %d, %d); %s", path, p->block_size,
            p->row_group, QBLOCK, QROWS, hint);
    // Bounds keep every product below 2^62: no overflow in the size arithmetic.
    struct { const char *name; int32_t v, max; } dims[] = {
        {"dim", p->dim, 1 << 20}, {"hidden_dim", p->hidden_dim, 1 << 22}, {"n_layers", p->n_layers, 1 << 12},
        {"n_heads", p->n_heads, 1 << 12}, {"n_kv_heads", p->n_kv_heads, 1 << 12},
        {"head_dim", p->head_dim, KV_HD_MAX}, {"n_experts", p->n_experts, 1 << 12},
        {"num_experts_per_tok", p->n_experts_per_tok, 1 << 12}, {"vocab_size", p->vocab_size, 1 << 24},
        {"max_seq_len", p->max_seq_len, INT32_MAX},
    };
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++)
        if (dims[i].v <= 0 || dims[i].v > dims[i].max)
            die("%s: corrupt header: %s = %d (must be 1..%d); %s", path, dims[i].name, dims[i].v, dims[i].max, hint);
    if (p->n_heads % p->n_kv_heads)
        die("%s: corrupt header: n_heads %d is not a multiple of n_kv_heads %d; %s", path, p->n_heads, p->n_kv_heads, hint);
    if (quantized && (p->dim % QBLOCK || p->hidden_dim % QBLOCK || (p->n_heads * p->head_dim) % QBLOCK))
        die("%s: corrupt header: dimensions are not multiples of the block size %d; %s", path, QBLOCK, hint);
    if (p->head_dim % 2) die("%s: corrupt header: head_dim %d is odd (RoPE needs pairs); %s", path, p->head_dim, hint);
    if (p->n_experts_per_tok > p->n_experts)
        die("%s: corrupt header: num_experts_per_tok %d > n_experts %d; %s", path, p->n_experts_per_tok, p->n_experts, hint);
    if (p->sliding_window < 0) die("%s: corrupt header: sliding_window %d; %s", path, p->sliding_window, hint);
    if (p->bos_id < 0 || p->bos_id >= p->vocab_size || p->eos_id < 0 || p->eos_id >= p->vocab_size)
        die("%s: corrupt header: bos/eos ids %d/%d outside the vocabulary; %s", path, p->bos_id, p->eos_id, hint);
    // NaN fails both comparisons; export.py's LIMITS are the same ranges
    if (!(p->rope_theta >= 1.0f && p->rope_theta <= 1e12f))
        die("%s: corrupt header: rope_theta %g (must be 1..1e12); %s", path, p->rope_theta, hint);
    if (!(p->rms_norm_eps >= 1e-12f && p->rms_norm_eps <= 0.1f))
        die("%s: corrupt header: rms_norm_eps %g (must be 1e-12..0.1); %s", path, p->rms_norm_eps, hint);
    if (p->tokenizer_offset != HEADER_SIZE || p->tokenizer_size > file_size ||
        p->weights_offset < p->tokenizer_offset + p->tokenizer_size || p->weights_offset % WEIGHTS_ALIGN)
        die("%s: corrupt header: section offsets; %s", path, hint);
    if (p->file_size != file_size)
        die("%s is %llu bytes but its header says %llu: truncated copy or interrupted export? %s", path,
            (unsigned long long)file_size, (unsigned long long)p->file_size, hint);
}

// The files people give instead of a model file, recognised so that the
// error can say what to do: a GGUF (llama.cpp), a safetensors shard or a
// Hugging Face folder all go through export.py first.
static void refuse_other_formats(const char *path, const uint8_t *head, uint64_t size) {
    const char *how = "make a mixtral.c model file from it with: python3 export.py";
    if (size >= 4 && !memcmp(head, "GGUF", 4))
        die("%s is a GGUF file (llama.cpp's format); %s %s model.bin --type q8", path, how, path);
    uint64_t json = 0;
    if (size >= 9) for (int i = 7; i >= 0; i--) json = json << 8 | head[i];
    if (size >= 9 && head[8] == '{' && json > 0 && json <= size - 8)
        die("%s looks like a safetensors file (one shard of a Hugging Face model); give export.py the folder that "
            "holds it, its config.json and tokenizer.model: python3 export.py FOLDER model.bin --type q8", path);
}

// Reads the whole file into anonymous memory, in 2 MB pages where the kernel
// allows: with 4 KB pages a core streaming weights misses the TLB every 4 KB,
// and the hardware prefetchers stop at every page boundary (measured on a
// Xeon: 10-30% slower prompts and decoding from a mapped file). Each worker of
// the pool reads a share: the kernel zeroes and fills the pages on every core
// at once (measured: 1.2 GB/s with one thread, 4-7 GB/s with two).
typedef struct {
    int fd;
    uint8_t *mem;
    uint64_t size;
    int progress;
    _Atomic uint64_t done;
    atomic_int failed;
    int64_t result; // of the read that failed
    uint64_t failed_at; // its offset
} ReadIn;

// Share tid of n of the file, in pieces of 64 MB (shares start on 2 MB pages).
// Worker 0 shows the progress of all, on a terminal.
static void read_job(void *arg, int tid, int n) {
    ReadIn *r = arg;
    uint64_t huge = 2u << 20, lo = r->size * tid / n / huge * huge;
    uint64_t hi = tid + 1 == n ? r->size : r->size * (tid + 1) / n / huge * huge;
    for (uint64_t at = lo; at < hi && !atomic_load(&r->failed);) {
        uint64_t want = hi - at < (64u << 20) ? hi - at : (64u << 20);
        int64_t got = read_at(r->fd, r->mem + at, want, at);
        if (got != (int64_t)want) {
            if (!atomic_exchange(&r->failed, 1)) { r->result = got; r->failed_at = at; }
            break;
        }
        at += (uint64_t)got;
        uint64_t done = atomic_fetch_add(&r->done, (uint64_t)got) + (uint64_t)got;
        if (tid == 0 && r->progress) fprintf(stderr, "\r[reading the model: %.1f of %.1f GB]", done / 1e9, r->size / 1e9);
    }
}

static uint8_t *read_in(int fd, uint64_t size, const char *path, ThreadPool *pool, size_t *alloc_size) {
    uint8_t *mem = anon_alloc(size, alloc_size);
    if (!mem) die("cannot allocate %.2f GB to read %s into (try --mmap)", size / 1e9, path);
    ReadIn r = {fd, mem, size, stderr_is_tty() && size > (1u << 30), 0, 0, 0, 0};
    if (pool) pool_run(pool, read_job, &r);
    else read_job(&r, 0, 1);
    if (r.progress) fprintf(stderr, "\r\033[K");
    if (atomic_load(&r.failed))
        die("cannot read %s at offset %llu: %s", path, (unsigned long long)r.failed_at, read_error(r.result));
    return mem;
}

// The checks on a model file's header (in m->config) against the file's size,
// before any of the file is read: every field, and the size the dimensions
// imply. Then model_attach() points the weights and the tokenizer into the
// file's bytes at m->map. (tests/fuzz/fuzz_model.c runs both on any bytes.)
static void model_check(const Config *p, uint64_t size, const char *path) {
    config_validate(p, size, path);
    uint64_t end = implied_file_size(p);
    if (end != size)
        die("%s: the header's dimensions imply %llu bytes of file, the file has %llu; corrupt header? re-run export.py",
            path, (unsigned long long)end, (unsigned long long)size);
}

static void model_attach(Model *m, const char *path) {
    const Config *p = &m->config;
    Weights *w = &m->weights;
    w->layers = xcalloc(p->n_layers, sizeof(Layer));
    for (int l = 0; l < p->n_layers; l++) w->layers[l].experts = xcalloc(p->n_experts, sizeof(Expert));
    walk_tensors(p, w, m->map);
    const char *err = tokenizer_init(&m->tokenizer, m->map + p->tokenizer_offset, p->tokenizer_size, p->vocab_size);
    if (err) die("%s: tokenizer section: %s; re-run export.py", path, err);
}

// With the expert cache: every weight but the experts and the embedding read
// into memory of the process (the file stays mapped only to find offsets;
// nothing reads through the mapping), so that they stay resident whatever the
// page cache does. The embedding, of which a token needs one row, is read a
// row at a time (embed_row_from_file). Returns the bytes they take.
static uint64_t keep_resident(Model *m, int fd, const char *path) {
    const Config *p = &m->config;
    Weights *w = &m->weights;
    int n = 0, most = 2 + 7 * p->n_layers;
    const void ***ptr = xcalloc(most, sizeof(*ptr));
    uint64_t *size = xcalloc(most, sizeof(*size));
#define KEEP(field, bytes) (ptr[n] = (const void **)&(field), size[n++] = (bytes))
    KEEP(w->norm, (uint64_t)p->dim * sizeof(float));
    KEEP(w->lm_head.data, w->lm_head.bytes);
    for (int l = 0; l < p->n_layers; l++) {
        Layer *L = &w->layers[l];
        KEEP(L->attn_norm, (uint64_t)p->dim * sizeof(float));
        KEEP(L->wq.data, L->wq.bytes);
        KEEP(L->wk.data, L->wk.bytes);
        KEEP(L->wv.data, L->wv.bytes);
        KEEP(L->wo.data, L->wo.bytes);
        KEEP(L->ffn_norm, (uint64_t)p->dim * sizeof(float));
        KEEP(L->gate, (uint64_t)p->n_experts * p->dim * sizeof(float));
    }
#undef KEEP
    uint64_t total = 0;
    for (int i = 0; i < n; i++) total += round_up(size[i], TENSOR_ALIGN);
    if (!(m->resident = anon_alloc(total, &m->resident_alloc)))
        die("cannot allocate %.2f GB for the weights besides the experts", total / 1e9);
    uint64_t at = 0;
    for (int i = 0; i < n; i++) {
        uint64_t from = (uint64_t)((const uint8_t *)*ptr[i] - m->map);
        int64_t r = read_at(fd, m->resident + at, size[i], from);
        if (r != (int64_t)size[i]) die("cannot read %s at offset %llu: %s", path, (unsigned long long)from, read_error(r));
        *ptr[i] = m->resident + at;
        at += round_up(size[i], TENSOR_ALIGN);
    }
    free(ptr);
    free(size);
    return round_up(total, 4096);
}

// The memory a run's working buffers take besides the weights and the KV
// cache: the state's buffers (state_init), the kernels' per thread, the
// tokenizer's tables, code and libc. What the expert cache's memory leaves for them.
static uint64_t working_memory(const Config *p, int chunk, int threads, int kv_len) {
    uint64_t C = (uint64_t)chunk, D = p->dim, H = p->hidden_dim, Q = (uint64_t)p->n_heads * p->head_dim;
    uint64_t K = p->n_experts_per_tok, widest = D > H ? D : H;
    uint64_t P = att_positions(chunk);
    return 4 * (C * (3 * D + 2 * Q + 2 * K * D + 2 * K * H + p->vocab_size) + P * p->n_heads * (kv_len + P - 1 + 2 * p->head_dim)) +
           (uint64_t)p->n_experts * C * widest * 5 / 4 + (uint64_t)threads * quant_scratch_bytes(C, widest) +
           (uint64_t)p->vocab_size * 32 + (2u << 20);
}

// Opens path, checks it, and maps it or reads it in (mode). With `mem` less
// than the file, or by default when the file is larger than the memory
// available, the experts go to the expert cache (cache_policy) with what is
// left of `mem` (or of the memory available, less the KV cache of `context`
// tokens and a reserve of 1/32) after the other weights and the working
// buffers of `chunk`-token chunks.
void model_load(Model *m, const char *path, LoadMode mode, ThreadPool *pool, uint64_t mem, int context, int chunk,
                int kv_type, int cache_policy) {
    memset(m, 0, sizeof(*m));
    struct stat st;
    if (stat(path, &st) != 0) die("cannot open model file %s: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode))
        die("%s is a folder, not a model file; if it is a Hugging Face model, make a model file from it with: "
            "python3 export.py %s model.bin --type q8", path, path);
    if (!S_ISREG(st.st_mode)) die("%s is not a regular file (a model file is mapped into memory)", path);
    int fd = open(path, O_RDONLY | O_NONBLOCK); // checked first, so a FIFO swapped in cannot block here
    if (fd < 0) die("cannot open model file %s: %s", path, strerror(errno));
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s is not a regular file", path);
    uint64_t size = (uint64_t)st.st_size;
    uint8_t head[16] = {0};
    int64_t r = read_at(fd, head, sizeof(head) < size ? sizeof(head) : size, 0);
    if (r < 0) die("cannot read %s at offset 0: %s", path, read_error(r));
    refuse_other_formats(path, head, size);
    if (size < HEADER_SIZE) die("%s is %llu bytes, too small to be a model file; re-run export.py", path, (unsigned long long)size);
    if ((r = read_at(fd, &m->config, sizeof(Config), 0)) != (int64_t)sizeof(Config))
        die("cannot read %s at offset 0: %s", path, read_error(r));
    model_check(&m->config, size, path);
    m->map_size = size;
    uint64_t avail = available_memory();
    int expert_cache = mem ? mem < size : mode == LOAD_AUTO && avail && size + size / 8 > avail;
    m->in_memory = !expert_cache && (mode == LOAD_READ || (mode == LOAD_AUTO && size + size / 8 < avail));
    m->map = m->in_memory ? read_in(fd, size, path, pool, &m->alloc_size) : mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m->map == MAP_FAILED) die("cannot mmap %s: %s", path, strerror(errno));
    model_attach(m, path);
    if (!expert_cache) { close(fd); return; }
    const Config *p = &m->config;
    int kv_len = kv_len_of(p, context);
    uint64_t kv_bytes = kv_cache_bytes(p, context, kv_type);
    uint64_t work = working_memory(p, chunk, pool->n, kv_len);
    uint64_t given = mem ? mem : avail - avail / 32 > kv_bytes ? avail - avail / 32 - kv_bytes : 0;
    uint64_t resident = keep_resident(m, fd, path);
    uint64_t left = given > work + resident ? given - work - resident : 0;
    int L = p->n_layers, E = p->n_experts;
    uint64_t *span = xcalloc((size_t)L * E, sizeof(uint64_t));
    for (int l = 0; l < L; l++)
        for (int e = 0; e < E; e++) span[l * E + e] = (uint64_t)((const uint8_t *)m->weights.layers[l].experts[e].w1.data - m->map);
    const Expert *first = &m->weights.layers[0].experts[0];
    ExpertLayout layout = {L, E, span, (uint64_t)((const uint8_t *)first->w2.data + first->w2.bytes - (const uint8_t *)first->w1.data)};
    m->expert_cache = expert_cache_open(path, fd, size, &layout, left, cache_policy);
    m->memory_given = given;
    if (!m->expert_cache)
        die("%s: %.1f MB of memory is too little: the working buffers take %.1f MB, the weights other than the "
            "experts %.1f MB, and one expert %.1f MB more (give --mem a larger size)", path, given / 1e6,
            work / 1e6, resident / 1e6, expert_cache_slot_bytes(&layout) / 1e6);
    free(span);
}

void model_free(Model *m) {
    for (int l = 0; l < m->config.n_layers; l++) free(m->weights.layers[l].experts);
    free(m->weights.layers);
    tokenizer_free(&m->tokenizer);
    munmap((void *)m->map, m->in_memory ? m->alloc_size : m->map_size);
    if (m->expert_cache) {
        expert_cache_close(m->expert_cache);
        anon_free(m->resident, m->resident_alloc);
    }
}

// ----------------------------------------------------------------------------
// 6. sampler
//
// The next token from the logits, in this order: the repetition penalty, then
// temperature (0: the most likely token, and nothing else applies), then the
// filters, each on the probabilities left by the one before: top-k, min-p,
// top-p. The draw is from what the filters keep, renormalised.

typedef struct { float prob; int id; } ProbId;

typedef struct {
    float temperature;    // 0: greedy
    int top_k;            // keep the k most likely tokens; 0: off
    float min_p;          // keep tokens at least min_p times as likely as the best; 0: off
    float top_p;          // keep the smallest set of most likely tokens with this much mass; 1: off
    float repeat_penalty; // 1: off. A logit of a recent token: divided by it if positive, else multiplied
    int repeat_last_n;    // how many of the last tokens (prompt included) count as recent
    int *recent;          // (repeat_last_n,) ring of the last tokens
    int n_seen;           // tokens seen so far (the ring holds the last repeat_last_n of them)
    uint32_t *mark;       // (V,) scratch: when each token was last penalised
    uint32_t stamp;
    uint64_t rng;         // xorshift64* state
    ProbId *order;        // (V,) scratch for the filters: the candidates, then a heap of them
    ProbId *sorted;       // (V,) scratch: those a filter keeps, in order
} Sampler;

static void sampler_init(Sampler *sm, int vocab_size) {
    if (sm->repeat_last_n > 0) sm->recent = xcalloc(sm->repeat_last_n, sizeof(int));
    sm->mark = xcalloc(vocab_size, sizeof(uint32_t));
    sm->order = xcalloc(vocab_size, sizeof(ProbId));
    sm->sorted = xcalloc(vocab_size, sizeof(ProbId));
    if (!sm->rng) sm->rng = 0x9E3779B97F4A7C15ULL; // xorshift's state must not be 0
}

static void sampler_free(Sampler *sm) { free(sm->recent); free(sm->mark); free(sm->order); free(sm->sorted); }

// Every token of the sequence, prompt and generated, goes through here, so that
// the repetition penalty knows what is recent.
static void sampler_accept(Sampler *sm, int token) {
    if (sm->repeat_last_n > 0) sm->recent[sm->n_seen % sm->repeat_last_n] = token;
    sm->n_seen++;
}

static void sampler_reset(Sampler *sm) { sm->n_seen = 0; }

static uint32_t random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1DULL) >> 32);
}

static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; } // [0,1)

// Sixteen floats or ints at once: the compiler's generic vectors, which it
// turns into AVX-512, AVX2, NEON or plain code, each with the same results.
typedef float Floats16 __attribute__((vector_size(64)));
typedef int32_t Ints16 __attribute__((vector_size(64)));

// The index of the largest of x (the first, on ties): each of 16 lanes keeps
// the largest it sees and where, then the lanes compare.
int argmax(const float *x, int n) {
    int best = 0, i = 0;
    if (n >= 32) {
        Floats16 max, v;
        Ints16 at = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, index = at;
        memcpy(&max, x, sizeof(max));
        for (i = 16; i + 16 <= n; i += 16) {
            memcpy(&v, x + i, sizeof(v));
            index += 16;
            Ints16 more = v > max;
            max = (Floats16)((more & (Ints16)v) | (~more & (Ints16)max));
            at = (more & index) | (~more & at);
        }
        best = at[0];
        for (int j = 1; j < 16; j++) if (max[j] > x[best] || (max[j] == x[best] && at[j] < best)) best = at[j];
    }
    for (; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

// Whether a comes before b in the filters' order: more likely first, ties by id.
static inline int prob_before(ProbId a, ProbId b) { return a.prob > b.prob || (a.prob == b.prob && a.id < b.id); }

// The filters' candidates in a heap, most likely at the top, so that only the
// tokens a filter keeps are taken off it in order (a sort of all of them, as
// qsort did, cost a fifth of a small model's token, and qsort a fresh buffer).
static void heap_sift(ProbId *h, int n, int i) {
    for (;;) {
        int best = i, l = 2 * i + 1, r = l + 1;
        if (l < n && prob_before(h[l], h[best])) best = l;
        if (r < n && prob_before(h[r], h[best])) best = r;
        if (best == i) return;
        ProbId t = h[i]; h[i] = h[best]; h[best] = t;
        i = best;
    }
}

static void heap_build(ProbId *h, int n) { for (int i = n / 2 - 1; i >= 0; i--) heap_sift(h, n, i); }

// Takes the top of a heap of n (the next token in order) off it.
static ProbId heap_pop(ProbId *h, int n) {
    ProbId top = h[0];
    h[0] = h[n - 1];
    heap_sift(h, n - 1, 0);
    return top;
}

// How many of w (n) are at least level, and their sum (in *mass), sixteen at a time.
static int weight_at_or_above(const float *w, int n, float level, float *mass) {
    Floats16 sum = {0}, v;
    Ints16 count = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        memcpy(&v, w + i, sizeof(v));
        Ints16 in = v >= level; // -1 where it is, 0 where not
        sum += (Floats16)(in & (Ints16)v);
        count -= in;
    }
    int total = 0;
    *mass = 0.0f;
    for (int j = 0; j < 16; j++) { *mass += sum[j]; total += count[j]; }
    for (; i < n; i++) if (w[i] >= level) { *mass += w[i]; total++; }
    return total;
}

// Picks the next token from logits (V,), which it overwrites.
static int sample(Sampler *sm, float *logits, int n) {
    if (sm->repeat_penalty != 1.0f && sm->repeat_last_n > 0) { // each recent token once
        int last = sm->n_seen < sm->repeat_last_n ? sm->n_seen : sm->repeat_last_n;
        if (++sm->stamp == 0) { memset(sm->mark, 0, n * sizeof(uint32_t)); sm->stamp = 1; }
        for (int i = 0; i < last; i++) {
            int id = sm->recent[i];
            if (sm->mark[id] == sm->stamp) continue;
            sm->mark[id] = sm->stamp;
            logits[id] = logits[id] > 0 ? logits[id] / sm->repeat_penalty : logits[id] * sm->repeat_penalty;
        }
    }
    int top = argmax(logits, n);
    // A temperature so small that the largest logit over it overflows (-t 1e-38)
    // leaves all the mass on the most likely token: the greedy choice, where
    // the division would give inf - inf = NaN in the softmax.
    if (sm->temperature == 0.0f || !isfinite(logits[top] / sm->temperature)) return top;
    // Each token's weight e^((logit - max) / temperature): the softmax less its
    // division by the sum, which no filter needs (each compares weights with one
    // another or with a share of the sum).
    float lane[LANES];
    exp_lanes(logits, n, logits[top], 1.0f / sm->temperature, lane);
    float sum = 0.0f;
    for (int j = 0; j < LANES; j++) sum += lane[j];
    // The floor below which no filter keeps a token: min-p's (the most likely
    // token weighs 1); top-k's, a level with k tokens at or above it; top-p's,
    // when it is the only other filter, a level with more than top_p of the
    // weight min-p keeps at or above it (the nucleus ends there or above). The
    // levels are powers of 2, found by bisection, each try a pass over the weights.
    // No floor is above 1, the most likely token's weight: it is always kept.
    float floor = sm->min_p;
    int filtering_top_p = sm->top_p > 0.0f && sm->top_p < 1.0f;
    if (floor <= 0.0f && sm->top_k <= 0 && !filtering_top_p) {
        // No filter: a draw from every token, first of the lanes (lane j holds
        // the tokens j, j+16, j+32, ...), then in the lane drawn.
        float r = random_f32(&sm->rng) * sum;
        int j = 0;
        for (; j < LANES - 1 && r >= lane[j]; j++) r -= lane[j];
        int chosen = j;
        for (int i = j; i < n; i += LANES) {
            if (logits[i] > 0.0f) chosen = i;
            if (r < logits[i]) break;
            r -= logits[i];
        }
        return chosen;
    }
    double mass = -1; // of what min-p and top-k keep, once known: top-p's whole, when it follows min-p only
    if (filtering_top_p && sm->top_k <= 0) {
        float kept_mass = sum;
        if (floor > 0.0f) weight_at_or_above(logits, n, floor, &kept_mass);
        mass = kept_mass;
    }
    if (sm->top_k > 0 || filtering_top_p) {
        int high = 0, low = 31; // 2^-low holds (or nothing does); 2^-high does not (1 always holds)
        while (low - high > 1) {
            int mid = (low + high) / 2;
            float mass_above;
            int count_above = weight_at_or_above(logits, n, ldexpf(1.0f, -mid), &mass_above);
            int holds = sm->top_k > 0 ? count_above >= sm->top_k : mass_above > sm->top_p * (float)mass;
            if (holds) low = mid; else high = mid;
        }
        if (low < 31 && ldexpf(1.0f, -low) > floor) floor = ldexpf(1.0f, -low);
    }
    int m = 0;
    for (int start = 0; start < n; start += 64) { // most blocks of 64 hold none
        if (start + 64 <= n) {
            Floats16 v[4];
            memcpy(v, logits + start, sizeof(v));
            Ints16 in = (v[0] >= floor) | (v[1] >= floor) | (v[2] >= floor) | (v[3] >= floor);
            uint64_t bits[8];
            memcpy(bits, &in, sizeof(bits));
            if (!(bits[0] | bits[1] | bits[2] | bits[3] | bits[4] | bits[5] | bits[6] | bits[7])) continue;
        }
        for (int i = start; i < start + 64 && i < n; i++)
            if (logits[i] >= floor) sm->order[m++] = (ProbId){logits[i], i};
    }
    ProbId *kept = sm->order; // the candidates in the filters' order, once a filter needs it
    if (sm->top_k > 0 || filtering_top_p) {
        heap_build(sm->order, m);
        kept = sm->sorted;
        int heap = m, taken = 0, want = sm->top_k > 0 && sm->top_k < m ? sm->top_k : m;
        if (sm->top_k > 0 || mass < 0) { // top-k's tokens in order, then their mass
            for (; taken < want; taken++) kept[taken] = heap_pop(sm->order, heap--);
            m = want;
            mass = 0;
            for (int i = 0; i < m; i++) mass += kept[i].prob;
        }
        if (filtering_top_p) { // the smallest prefix whose mass exceeds top_p of what is left
            double cut = sm->top_p * mass, acc = 0;
            for (int i = 0; i < m; i++) {
                if (i >= taken) kept[i] = heap_pop(sm->order, heap--);
                acc += kept[i].prob;
                if (acc > cut) { m = i + 1; mass = acc; break; }
            }
        }
    } else if (mass < 0) {
        mass = 0;
        for (int i = 0; i < m; i++) mass += kept[i].prob;
    }
    double r = random_f32(&sm->rng) * mass, cdf = 0;
    for (int i = 0; i < m; i++) { cdf += kept[i].prob; if (r < cdf) return kept[i].id; }
    return kept[m - 1].id;
}

// ----------------------------------------------------------------------------
// 7. generation and chat

// What a run was asked for on the command line.
typedef struct {
    int steps;          // most tokens to generate per reply
    const char **stop;  // --stop: strings that end a reply (not printed)
    int n_stop;
    int stats, trace;   // --expert-stats, --trace-experts
    int quiet;          // --quiet: stdout's text only, nothing on stderr but errors
    const char *session; // --session: the file of the tokens and KV cache kept between runs, or NULL
    const char *model_path;
} RunOptions;

// Ctrl-C stops a reply (or a prompt being read in) instead of the program. The
// handler only raises this flag; the loops below look at it between tokens.
static volatile sig_atomic_t interrupted;

static void on_interrupt(int sig) { (void)sig; interrupted = 1; }

// restart = 0 lets Ctrl-C end a read() that waits for the user's line.
static void catch_interrupts(int restart) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_interrupt;
    sa.sa_flags = restart ? SA_RESTART : 0;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
}

// A mapped model file that gets shorter while the program runs (rewritten,
// truncated) makes the next read of a page past its new end raise SIGBUS:
// then say so and exit 1 instead of dying by the signal. Only async-signal-safe
// calls here.
static void on_bus_error(int sig) {
    (void)sig;
    static const char msg[] = "mixtral: error: the model file changed while it was in use (it got shorter under the "
                              "mapping); run again with the file as export.py wrote it\n";
    if (write(STDERR_FILENO, msg, sizeof(msg) - 1) < 0) _exit(1);
    _exit(1);
}

static void catch_bus_errors(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_bus_error;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, NULL);
}

// Resident memory in MB: now (Linux's /proc), and the peak so far.
static double resident_mb(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = -1, resident = -1;
    if (f) { if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1; fclose(f); }
    return resident < 0 ? -1 : resident * (double)sysconf(_SC_PAGESIZE) / 1e6;
}

static double peak_resident_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
#ifdef __APPLE__
    return ru.ru_maxrss / 1e6; // bytes there, kilobytes elsewhere
#else
    return ru.ru_maxrss * 1024.0 / 1e6;
#endif
}

static double per_second(double n, double seconds) { return n / (seconds > 0 ? seconds : 1e-9); }

// The line that ends every run, on stderr.
static void print_summary(int prompt_tokens, double prompt_s, int gen_tokens, double gen_s) {
    fprintf(stderr, "prompt: %d tokens, %.2f tok/s; generated: %d tokens, %.2f tok/s; peak RSS %.0f MB\n",
            prompt_tokens, per_second(prompt_tokens, prompt_s), gen_tokens, per_second(gen_tokens, gen_s),
            peak_resident_mb());
}

// Whether feeding n tokens shows its progress: on a terminal, for more than a chunk.
static int show_progress(const RunOptions *opt, const State *s, int n) {
    return !opt->quiet && stderr_is_tty() && n > s->chunk;
}

static void print_expert_cache(ExpertCache *c, FILE *out) {
    ExpertCacheReport r = expert_cache_report(c);
    expert_cache_print(&r, out);
}

// Runs ids through the model from position *pos on, in chunks; the logits of
// the last one are left in s->logits. Shows progress on a terminal when asked.
// Returns how many went in: fewer than n when Ctrl-C stopped it between chunks.
static int feed(Model *m, State *s, Sampler *sm, const int *ids, int n, int *pos, int progress) {
    double t0 = time_s();
    int i = 0;
    while (i < n && !interrupted) {
        int c = chunk_len(n, i, s->chunk);
        forward_chunk(m, s, ids + i, c, *pos, 0);
        for (int j = 0; sm && j < c; j++) sampler_accept(sm, ids[i + j]);
        *pos += c;
        i += c;
        if (progress)
            fprintf(stderr, "\r[prompt: %d/%d tokens, %.1f tok/s]", i, n, per_second(i, time_s() - t0));
    }
    if (progress) fprintf(stderr, "\r\033[K"); // the progress line goes away
    return i;
}

// Writes the text of ids through decoder d to stdout (what d holds back of
// an unfinished character stays in it, for the ids that follow).
void echo_ids(TokenDecoder *d, const Tokenizer *t, const int *ids, int n) {
    char *buf = xcalloc(decoder_max_bytes(t), 1);
    for (int i = 0; i < n; i++) fwrite(buf, 1, decoder_put(d, t, ids[i], buf), stdout);
    fflush(stdout);
    free(buf);
}

// The text of a reply on its way to stdout. With --stop strings, text that
// could be the beginning of one is held back until it is known not to be, and
// the text from a stop string on is never printed.
typedef struct {
    const RunOptions *opt;
    char *held;
    size_t n, cap;
    int stopped;
} TextOut;

static void text_put(TextOut *o, const char *s, size_t n) {
    if (o->stopped || n == 0) return;
    if (o->opt->n_stop == 0) { fwrite(s, 1, n, stdout); fflush(stdout); return; }
    if (o->n + n > o->cap) {
        o->cap = 2 * (o->n + n);
        if (!(o->held = realloc(o->held, o->cap))) die("out of memory");
    }
    memcpy(o->held + o->n, s, n);
    o->n += n;
    size_t cut = o->n, keep = 0; // cut: where the first stop string begins; keep: a tail that may begin one
    for (int i = 0; i < o->opt->n_stop; i++) {
        const char *stop = o->opt->stop[i];
        size_t len = strlen(stop);
        const char *at = memmem(o->held, o->n, stop, len);
        if (at && (size_t)(at - o->held) < cut) cut = at - o->held;
        for (size_t k = len - 1 < o->n ? len - 1 : o->n; k > keep; k--)
            if (!memcmp(o->held + o->n - k, stop, k)) { keep = k; break; }
    }
    if (cut < o->n) { fwrite(o->held, 1, cut, stdout); o->stopped = 1; o->n = 0; }
    else { fwrite(o->held, 1, o->n - keep, stdout); memmove(o->held, o->held + o->n - keep, keep); o->n = keep; }
    fflush(stdout);
}

static void text_close(TextOut *o) {
    if (!o->stopped && o->n) fwrite(o->held, 1, o->n, stdout);
    fflush(stdout);
    free(o->held);
}

typedef struct { int tokens; int context_full, stopped, interrupted; double seconds; } Reply;

// --trace-experts: the routing of each generated token, printed after generation.
typedef struct {
    int n, cap;
    int *token;       // (n,)
    int *chosen;      // (n, n_layers, top_k)
    float *weight;    // (n, n_layers, top_k)
} Trace;

static void trace_add(Trace *tr, const State *s, const Config *p, int token) {
    size_t per = (size_t)p->n_layers * p->n_experts_per_tok;
    if (tr->n == tr->cap) {
        tr->cap = tr->cap ? 2 * tr->cap : 64;
        tr->token = realloc(tr->token, tr->cap * sizeof(int));
        tr->chosen = realloc(tr->chosen, tr->cap * per * sizeof(int));
        tr->weight = realloc(tr->weight, tr->cap * per * sizeof(float));
        if (!tr->token || !tr->chosen || !tr->weight) die("out of memory");
    }
    tr->token[tr->n] = token;
    memcpy(tr->chosen + tr->n * per, s->chosen, per * sizeof(int));
    memcpy(tr->weight + tr->n * per, s->chosen_w, per * sizeof(float));
    tr->n++;
}

// Samples up to opt->steps tokens after what has been fed, streaming their text
// through dec (which may already hold the prompt's, so that the text printed is
// the whole sequence decoded as one stream), until EOS, a stop string, a full
// context or Ctrl-C. The sampled EOS is not fed: the caller does that when the
// conversation goes on.
static Reply reply(Model *m, State *s, Sampler *sm, const RunOptions *opt, int *pos, TokenDecoder *dec, Trace *trace) {
    const Config *p = &m->config;
    Reply r = {0};
    char *buf = xcalloc(decoder_max_bytes(&m->tokenizer), 1);
    TextOut out = {.opt = opt};
    double t0 = time_s();
    while (r.tokens < opt->steps && !interrupted) {
        int token = sample(sm, s->logits, p->vocab_size);
        r.tokens++;
        if (token == p->eos_id) break;
        text_put(&out, buf, decoder_put(dec, &m->tokenizer, token, buf));
        if (out.stopped) { r.stopped = 1; break; }
        if (*pos >= s->context) { r.context_full = 1; break; }
        forward(m, s, token, (*pos)++);
        sampler_accept(sm, token);
        if (trace) trace_add(trace, s, p, token); // the experts that processed this token
    }
    text_put(&out, buf, decoder_flush(dec, buf));
    text_close(&out);
    r.interrupted = interrupted;
    r.seconds = time_s() - t0;
    free(buf);
    return r;
}

// --- looking inside the router ----------------------------------------------

// A token as a short printable label: the piece with spaces shown, control
// characters escaped, cut to `width` bytes (on a UTF-8 boundary).
static void token_label(const Tokenizer *t, int id, char *out, int width) {
    const char *p = t->piece[id];
    int n = t->piece_len[id], o = 0;
    for (int i = 0; i < n && o < width - 4;) {
        unsigned char c = (unsigned char)p[i];
        if (i + 3 <= n && !memcmp(p + i, "\xE2\x96\x81", 3)) { out[o++] = '_'; i += 3; continue; }
        if (c < 0x20 || c == 0x7f) { o += snprintf(out + o, width - o, "\\x%02x", c); i++; continue; }
        int len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : 4;
        if (o + len > width - 1 || i + len > n) break;
        memcpy(out + o, p + i, len);
        o += len;
        i += len;
    }
    out[o] = 0;
}

// Display width of a UTF-8 string, counting each character as one column.
static int utf8_width(const char *s) {
    int w = 0;
    for (; *s; s++) w += ((unsigned char)*s & 0xC0) != 0x80;
    return w;
}

// --expert-stats: how often each expert was chosen, per layer, over every token
// the model processed since the counts were last cleared (prompt and generated),
// with a heatmap and two entropies: of the usage counts (load balance; log2(E)
// bits when perfectly even) and of the router's softmax, averaged over tokens
// (how decided the router is).
static void print_expert_stats(const Config *p, const State *s) {
    int E = p->n_experts, top_k = p->n_experts_per_tok;
    const char *shades = " .:-=+*#%@"; // share of choices relative to an even share 1/E: 0 .. 2x and over
    uint64_t n = s->counts.tokens_routed;
    printf("\nexpert usage over %llu tokens (top-%d of %d experts; heat: ' ' none, '=' an even share, '%%' twice that)\n",
           (unsigned long long)n, top_k, E);
    printf("layer |");
    for (int e = 0; e < E; e++) printf(" %5d", e);
    printf(" | heat%*s | usage H | router H\n", E > 4 ? E - 4 : 0, "");
    for (int l = 0; l < p->n_layers; l++) {
        const uint64_t *c = s->counts.expert_count + (size_t)l * E;
        double total = 0, h = 0;
        for (int e = 0; e < E; e++) total += c[e];
        printf("%5d |", l);
        for (int e = 0; e < E; e++) printf(" %5llu", (unsigned long long)c[e]);
        printf(" | ");
        for (int e = 0; e < E; e++) {
            double rel = total > 0 ? c[e] / total * E : 0; // 1: an even share of the choices
            int i = (int)(rel * 4 + 0.5);
            putchar(shades[i < 0 ? 0 : i > 9 ? 9 : i]);
            if (total > 0 && c[e] > 0) h -= c[e] / total * log2(c[e] / total);
        }
        printf("%*s | %7.2f | %8.2f\n", E < 4 ? 4 - E : 0, "", h, n ? s->counts.router_entropy[l] / n : 0.0);
    }
    printf("(entropies in bits; even usage over %d experts is %.2f)\n", E, log2(E));
    if (s->expert_cache) print_expert_cache(s->expert_cache, stdout);
}

// --trace-experts: for each generated token, the experts that processed it in
// every layer, as "a+b .62": the chosen experts, best first, and the weight of
// the best. Layers go in blocks of TRACE_LAYERS columns, each under its header.
#define TRACE_LAYERS 8

static void print_trace(const Model *m, const Trace *tr) {
    const Config *p = &m->config;
    int top_k = p->n_experts_per_tok, L = p->n_layers;
    int digits = p->n_experts > 100 ? 3 : p->n_experts > 10 ? 2 : 1;
    int col = top_k * digits + (top_k - 1) + 4;
    char label[64], name[16];
    printf("\nexperts per generated token and layer (chosen experts, best first, and the best one's weight)\n");
    for (int l0 = 0; l0 < L; l0 += TRACE_LAYERS) {
        int l1 = l0 + TRACE_LAYERS < L ? l0 + TRACE_LAYERS : L;
        printf("%s%-14s", l0 ? "\n" : "", "token");
        for (int l = l0; l < l1; l++) { snprintf(name, sizeof(name), "L%d", l); printf(" %-*s", col, name); }
        printf("\n");
        for (int i = 0; i < tr->n; i++) {
            token_label(&m->tokenizer, tr->token[i], label, 14);
            printf("%s%*s", label, 14 - utf8_width(label), "");
            for (int l = l0; l < l1; l++) {
                const int *c = tr->chosen + ((size_t)i * L + l) * top_k;
                const float *w = tr->weight + ((size_t)i * L + l) * top_k;
                char cell[64];
                int o = 0;
                for (int k = 0; k < top_k && o < 48; k++) o += snprintf(cell + o, sizeof(cell) - o, k ? "+%d" : "%d", c[k]);
                int pct = w[0] >= 0.0f && w[0] < 0.995f ? (int)(w[0] * 100 + 0.5f) : w[0] >= 0.995f ? 99 : 0; // NaN: 0
                snprintf(cell + o, sizeof(cell) - o, " .%02d", pct);
                printf(" %-*s", col, cell);
            }
            printf("\n");
        }
    }
}

static void trace_free(Trace *tr) { free(tr->token); free(tr->chosen); free(tr->weight); }

// After a reply: the routing it asked for, on stdout.
static void print_routing(const Model *m, const State *s, const RunOptions *opt, const Trace *tr) {
    if (opt->trace) print_trace(m, tr);
    if (opt->stats) print_expert_stats(&m->config, s);
    fflush(stdout);
}

// --session: the positions whose keys and values the session file held for
// the start of ids (n tokens), and the sampler told of them. 0 without one.
static int resume(const Model *m, State *s, Sampler *sm, const RunOptions *opt, const int *ids, int n) {
    if (!opt->session) return 0;
    int reused = session_resume(opt->session, m, s, ids, n);
    for (int i = 0; i < reused; i++) sampler_accept(sm, ids[i]);
    if (!opt->quiet && reused) fprintf(stderr, "[%d tokens from %s]\n", reused, opt->session);
    return reused;
}

// --session: the first n positions' tokens and keys and values saved for the next run.
static void keep_session(const Model *m, const State *s, const RunOptions *opt, int n) {
    if (!opt->session || n <= 0) return;
    const char *inputs[] = {opt->model_path};
    session_save(opt->session, m, s, n, inputs, 1);
}

// Continues a prompt. Returns the exit status: 0, or 130 after Ctrl-C.
static int generate(Model *m, State *s, Sampler *sm, const char *prompt, size_t prompt_len, const RunOptions *opt) {
    const Config *p = &m->config;
    IdList prompt_ids = {0};
    ids_push(&prompt_ids, p->bos_id);
    ids_push_text(&prompt_ids, &m->tokenizer, prompt, prompt_len);
    int n = prompt_ids.n;
    if (n > s->context)
        die("the prompt is %d tokens (BOS included) but the context holds %d; use -c %d or more", n, s->context, n + 1);

    // echo the prompt, then continue it with the same decoder: one stream of text
    TokenDecoder dec;
    decoder_init(&dec);
    echo_ids(&dec, &m->tokenizer, prompt_ids.ids + 1, n - 1);

    double t0 = time_s();
    int pos = resume(m, s, sm, opt, prompt_ids.ids, n);
    int fed = feed(m, s, sm, prompt_ids.ids + pos, n - pos, &pos, show_progress(opt, s, n - pos));
    double t_prompt = time_s() - t0;
    Trace tr = {0};
    Reply r = {0};
    if (pos == n) r = reply(m, s, sm, opt, &pos, &dec, opt->trace ? &tr : NULL);
    keep_session(m, s, opt, pos);
    printf("\n");
    print_routing(m, s, opt, &tr);
    trace_free(&tr);
    if (r.context_full)
        fprintf(stderr, "mixtral: stopped: the context of %d tokens is full (use a larger -c)\n", s->context);
    if (interrupted && !opt->quiet) fprintf(stderr, "mixtral: interrupted\n");
    if (!opt->quiet) print_summary(fed, t_prompt, r.tokens, r.seconds);
    if (!opt->quiet && s->expert_cache) print_expert_cache(s->expert_cache, stderr);
    free(prompt_ids.ids);
    return interrupted ? 130 : 0;
}

// --- chat --------------------------------------------------------------------
// Mistral's instruct format and the conversation-file reader are in chat.c.

// Reads and formats a conversation file into ids (BOS first), or dies saying why.
void read_conversation(const Model *m, const char *path, IdList *ids, Conversation *conv) {
    size_t len;
    char *text = read_file(path, &len);
    const char *err = chat_parse(text, len, conv);
    free(text);
    if (err) die("%s: %s", path, err);
    if ((err = chat_format(ids, &m->tokenizer, m->config.bos_id, m->config.eos_id, conv))) die("%s: %s", path, err);
}

// Reads one line of any length from stdin; NULL at end of input or on Ctrl-C.
static char *read_line(size_t *len) {
    size_t cap = 256, n = 0;
    char *s = xcalloc(cap, 1);
    int c = 0;
    catch_interrupts(0); // Ctrl-C ends the wait for input
    while (!interrupted && (c = getchar()) != EOF && c != '\n') {
        if (n + 1 == cap) { cap *= 2; if (!(s = realloc(s, cap))) die("out of memory"); }
        s[n++] = (char)c;
    }
    catch_interrupts(1);
    if (interrupted || (c == EOF && n == 0)) { free(s); return NULL; }
    s[n] = 0;
    *len = n;
    return s;
}

static int is_blank(const char *s) {
    for (; *s; s++) if (!strchr(" \t\r\v\f", *s)) return 0;
    return 1;
}

static void print_context_full(const State *s) {
    fprintf(stderr, "\n[the context of %d tokens is full. Type /reset to start a new conversation, "
                    "or restart with a larger -c]\n", s->context);
}

// Totals over a chat session, for its closing summary.
typedef struct { int in_tokens, out_tokens; double in_s, out_s; } ChatTotals;

// One assistant reply in chat, after its input has been fed; dec may already
// hold the beginning of the reply (a conversation file's unfinished message).
static void chat_reply(Model *m, State *s, Sampler *sm, const RunOptions *opt, int *pos, TokenDecoder *dec,
                       ChatTotals *tot) {
    Trace tr = {0};
    Reply r = reply(m, s, sm, opt, pos, dec, opt->trace ? &tr : NULL);
    printf("\n");
    print_routing(m, s, opt, &tr);
    trace_free(&tr);
    if (r.context_full) print_context_full(s);
    if (r.interrupted) { interrupted = 0; if (!opt->quiet) fprintf(stderr, "[reply stopped]\n"); }
    tot->out_tokens += r.tokens;
    tot->out_s += r.seconds;
    if (!opt->quiet)
        fprintf(stderr, "[%d out, %.2f tok/s; context %d/%d]\n", r.tokens, per_second(r.tokens, r.seconds), *pos,
                s->context);
}

// Interactive chat. The KV cache persists between turns, so each turn runs only
// its new tokens through the model. Ctrl-C stops a reply; at the prompt it
// leaves, as end of input and /quit do.
static void chat(Model *m, State *s, Sampler *sm, const char *system, const char *conv_path, const RunOptions *opt) {
    const Config *p = &m->config;
    IdList turn = {0};
    ChatTotals tot = {0};
    int pos = 0, replied = 0; // replied: an assistant reply whose EOS is not yet in the KV cache
    int complete = 0;         // the conversation file's last answer is closed: the user speaks next
    if (conv_path) { // pick up a saved conversation
        Conversation conv;
        read_conversation(m, conv_path, &turn, &conv);
        int last = -1, last_msg = -1;
        for (int i = 0; i < conv.n; i++) if (conv.msgs[i].role != ROLE_SYSTEM) { last = conv.msgs[i].role; last_msg = i; }
        if (last < 0) die("%s has no user or assistant message: nothing to reply to", conv_path);
        if (turn.n > s->context) die("%s is %d tokens but the context holds %d; use a larger -c", conv_path, turn.n, s->context);
        TokenDecoder dec;
        decoder_init(&dec);
        complete = last == ROLE_ASSISTANT && !chat_open_ending(&conv);
        if (!complete) printf("Assistant: ");
        if (last == ROLE_ASSISTANT && !complete) { // continue the final message: its text, then more of it
            IdList tail = {0};
            ids_push_text(&tail, &m->tokenizer, conv.msgs[last_msg].content, conv.msgs[last_msg].len);
            echo_ids(&dec, &m->tokenizer, turn.ids + turn.n - tail.n, tail.n);
            free(tail.ids);
        }
        chat_free(&conv);
        double t0 = time_s();
        int reused = pos = resume(m, s, sm, opt, turn.ids, turn.n);
        if (feed(m, s, sm, turn.ids + pos, turn.n - pos, &pos, show_progress(opt, s, turn.n - pos)) < turn.n - reused)
            die("interrupted while reading %s", conv_path);
        tot.in_tokens += turn.n - reused;
        tot.in_s += time_s() - t0;
        if (!opt->quiet)
            fprintf(stderr, "[%d tokens in, %.2f tok/s, in %.2f s]\n", turn.n - reused, per_second(turn.n - reused, time_s() - t0),
                    time_s() - t0);
        if (!complete) {
            chat_reply(m, s, sm, opt, &pos, &dec, &tot);
            replied = 1;
        }
        system = NULL; // it belonged to the file's first user message
    }
    for (;;) {
        printf("User: ");
        fflush(stdout);
        size_t len;
        char *line = read_line(&len);
        if (!line && complete && !isatty(fileno(stdin)))
            fprintf(stderr, "\nmixtral: %s is complete (its last message is the assistant's, closed with EOS): give the "
                            "next user message on standard input, or mark that message \"prefix\": true to continue it\n",
                    conv_path);
        complete = 0;
        if (!line) { if (interrupted) printf("\n"); break; }
        if (!strcmp(line, "/quit")) { free(line); break; }
        if (!strcmp(line, "/reset")) {
            pos = 0;
            replied = 0;
            sampler_reset(sm);
            printf("[new conversation]\n");
            free(line);
            continue;
        }
        if (is_blank(line)) { free(line); continue; } // not a turn
        int start = pos;
        turn.n = 0;
        if (pos == 0) ids_push(&turn, p->bos_id);
        if (replied) ids_push(&turn, p->eos_id); // closes the previous reply
        chat_format_user(&turn, &m->tokenizer, pos == 0 ? system : NULL, line, len);
        free(line);
        if (pos + turn.n >= s->context) { print_context_full(s); continue; }
        if (opt->stats) clear_counts(p, s); // the statistics of this turn
        double t0 = time_s();
        int fed = feed(m, s, sm, turn.ids, turn.n, &pos, show_progress(opt, s, turn.n));
        double t_in = time_s() - t0;
        if (fed < turn.n) { // Ctrl-C before the reply began: the turn never happened
            pos = start;
            interrupted = 0;
            printf("\n");
            continue;
        }
        tot.in_tokens += turn.n;
        tot.in_s += t_in;
        // only this turn's tokens went through the model: the KV cache holds the rest
        if (!opt->quiet) fprintf(stderr, "[%d new tokens in, %.2f tok/s]\n", turn.n, per_second(turn.n, t_in));
        printf("Assistant: ");
        TokenDecoder dec;
        decoder_init(&dec);
        chat_reply(m, s, sm, opt, &pos, &dec, &tot);
        replied = 1;
    }
    keep_session(m, s, opt, pos);
    if (!opt->quiet) print_summary(tot.in_tokens, tot.in_s, tot.out_tokens, tot.out_s);
    if (!opt->quiet && s->expert_cache) print_expert_cache(s->expert_cache, stderr);
    free(turn.ids);
}

// ----------------------------------------------------------------------------
// 8. bench

// --bench: a 128-token prompt of fixed pseudo-random ids, then 64 greedy
// tokens and 64 drawn with the command line's sampling (EOS does not stop it). Decode speed is reported with the bytes of
// weights and KV cache it read, and the closing JSON line is for scripts. With
// --bench-depth also a 512-token prompt, and decoding (32 tokens) after 1024,
// 4096, 16384 and 32768 tokens of context, and a 512-token prompt after 8192
// (by default with the context that needs).
// n tokens, greedy, or drawn by sm (then *sampling: the seconds sample() took).
static double bench_decode(Model *m, State *s, int n, int *pos, Sampler *sm, double *sampling) {
    double t0 = time_s();
    for (int i = 0; i < n; i++) {
        int token;
        if (sm) {
            double t = time_s();
            token = sample(sm, s->logits, m->config.vocab_size);
            *sampling += time_s() - t;
        } else {
            token = argmax(s->logits, m->config.vocab_size);
        }
        forward(m, s, token, (*pos)++);
    }
    return n / (time_s() - t0);
}

static double bench_prompt(Model *m, State *s, int n, int *pos) {
    int *ids = xcalloc(n, sizeof(int));
    uint64_t rng = 0x2545F4914F6CDD1DULL + (uint64_t)*pos;
    ids[0] = *pos ? (int)(random_u32(&rng) % (uint32_t)m->config.vocab_size) : m->config.bos_id;
    for (int i = 1; i < n; i++) ids[i] = (int)(random_u32(&rng) % (uint32_t)m->config.vocab_size);
    double t0 = time_s();
    feed(m, s, NULL, ids, n, pos, 0);
    double rate = n / (time_s() - t0);
    free(ids);
    return rate;
}

// Bytes this process has had read from storage so far (Linux: /proc/self/io,
// page faults of a mapping included); 0 where unknown.
static uint64_t disk_read_bytes(void) { return proc_number("/proc/self/io", "read_bytes: %llu"); }

static void bench(Model *m, State *s, Sampler *sm, int threads, int depth) {
    const Config *p = &m->config;
    enum { PROMPT = 128, DECODE = 64, DEPTH_DECODE = 32 };
    if (s->context < PROMPT + 2 * DECODE) die("--bench needs a context of at least %d tokens (-c)", PROMPT + 2 * DECODE);
    // Warm-up, as llama-bench has one: touch every page of the file once, so
    // that the timings measure the engine rather than the kernel mapping the
    // weights into this process on their first use.
    if (!m->expert_cache) // (with the expert cache, the mapping is not read)
        for (uint64_t at = 0; at < m->map_size; at += 4096) (void)((const volatile uint8_t *)m->map)[at];
    int pos = 0;
    double prefill = bench_prompt(m, s, PROMPT, &pos);
    ExpertCacheReport c0 = {0}, c1 = {0};
    if (m->expert_cache) c0 = expert_cache_report(m->expert_cache);
    uint64_t bytes0 = s->counts.memory_bytes, io0 = disk_read_bytes();
    double decode = bench_decode(m, s, DECODE, &pos, NULL, NULL);
    if (m->expert_cache) c1 = expert_cache_report(m->expert_cache);
    double io_per_token = (double)(disk_read_bytes() - io0) / DECODE; // from the disk, however the weights came
    double expert_reads_per_token = (double)(c1.file_bytes - c0.file_bytes) / DECODE;
    double bytes = (double)(s->counts.memory_bytes - bytes0) / DECODE;
    fprintf(stderr, "%s weights, %s kernels, %d threads: prefill %.2f tok/s, decode %.2f tok/s, "
                    "%.1f MB read per token, %.2f GB/s\n", weight_type_name[p->weight_type], kernels_simd_name, threads,
            prefill, decode, bytes / 1e6, bytes * decode / 1e9);
    char extra[768] = "";
    int o = 0;
    if (sm->temperature > 0) { // what sampling adds to a token
        double sampling = 0, sampled = bench_decode(m, s, DECODE, &pos, sm, &sampling);
        double share = sampling / DECODE * decode;
        fprintf(stderr, "sampled decode (-t %g -p %g --top-k %d --min-p %g): %.2f tok/s; sampling %.1f us a token, "
                        "%.1f%% of a greedy token\n", sm->temperature, sm->top_p, sm->top_k, sm->min_p, sampled,
                sampling / DECODE * 1e6, 100 * share);
        o += snprintf(extra + o, sizeof(extra) - o, ", \"sampled_decode_tok_s\": %.3f, \"sample_us\": %.2f, "
                      "\"sample_share\": %.4f", sampled, sampling / DECODE * 1e6, share);
    }
    if (depth) { // one sequence that grows: a 512-token prompt first, then to each depth and decode there
        pos = 0;
        double pp512 = bench_prompt(m, s, 512, &pos);
        fprintf(stderr, "512-token prompt: %.2f tok/s\n", pp512);
        o += snprintf(extra + o, sizeof(extra) - o, ", \"pp512_tok_s\": %.3f", pp512);
        static const int depths[] = {1024, 4096, 8192, 16384, 32768};
        for (int i = 0; i < 5; i++) {
            int d = depths[i], need = d + (d == 8192 ? 512 : DEPTH_DECODE);
            if (s->context < need) {
                fprintf(stderr, "after %d tokens: skipped, it needs -c %d (this run's is %d)\n", d, need, s->context);
                continue;
            }
            if (pos < d) bench_prompt(m, s, d - pos, &pos);
            if (d == 8192) { // a prompt after a long context: attention over 8k keys for each token
                double r = bench_prompt(m, s, 512, &pos);
                fprintf(stderr, "512-token prompt after %d tokens: %.2f tok/s\n", d, r);
                o += snprintf(extra + o, sizeof(extra) - o, ", \"pp512_at_%d_tok_s\": %.3f", d, r);
                continue;
            }
            double r = bench_decode(m, s, DEPTH_DECODE, &pos, NULL, NULL);
            fprintf(stderr, "decoding after %d tokens: %.2f tok/s\n", d, r);
            o += snprintf(extra + o, sizeof(extra) - o, ", \"decode_at_%d_tok_s\": %.3f", d, r);
        }
    }
    if (m->expert_cache) {
        ExpertCacheReport c = expert_cache_report(m->expert_cache);
        expert_cache_print(&c, stderr);
        uint64_t lookups = c.hits + c.misses;
        o += snprintf(extra + o, sizeof(extra) - o, ", \"cache_hit_rate\": %.4f, \"prefetch_accuracy\": %.4f, \"read_mb\": %.1f, "
                      "\"read_mb_s\": %.1f, \"decode_read_mb_per_token\": %.2f, \"cache_slots\": %d, "
                      "\"cache_budget_mb\": %.0f, \"cache_slot_mb\": %.1f, \"cache_slot_bytes\": %llu, "
                      "\"cache_other_bytes\": %llu",
                      lookups ? (double)c.hits / lookups : 0.0, c.prefetched ? (double)c.prefetch_used / c.prefetched : 0.0,
                      c.file_bytes / 1e6, c.read_seconds > 0 ? c.file_bytes / 1e6 / c.read_seconds : 0.0,
                      expert_reads_per_token / 1e6, c.n_slots, m->memory_given / 1e6, c.slot_bytes / 1e6,
                      (unsigned long long)c.slot_bytes, (unsigned long long)(m->memory_given - c.memory));
    }
    snprintf(extra + o, sizeof(extra) - o, ", \"peak_rss_mb\": %.0f, \"disk_read_mb_per_token\": %.2f",
             peak_resident_mb(), io_per_token / 1e6);
    printf("{\"prefill_tok_s\": %.3f, \"decode_tok_s\": %.3f, \"threads\": %d, \"bytes_per_token\": %.0f, "
           "\"gb_per_s\": %.3f, \"weight_type\": \"%s\", \"kernels\": \"%s\"%s}\n",
           prefill, decode, threads, bytes, bytes * decode / 1e9, weight_type_name[p->weight_type], kernels_simd_name,
           extra);
}

// ----------------------------------------------------------------------------
// 9. command line

#define PROGRAM_VERSION "0.5"

static void print_usage(FILE *out) {
    fprintf(out,
        "usage: mixtral MODEL.bin [options]   (mixtral -h: this help; mixtral --version)\n"
        "  -i, --prompt TEXT     prompt (default: empty, generation starts from BOS)\n"
        "  -f, --file F          prompt from file F (- for standard input), one final newline dropped\n"
        "  -n, --steps N         most tokens to generate (per reply in chat; default 256)\n"
        "  -c, --context N       context in tokens (default min(4096, model max)); the KV cache holds\n"
        "                        this many, or the sliding window if the model has a shorter one\n"
        "  -m, --mode MODE       generate or chat (default generate)\n"
        "  -y, --system TEXT     chat: system prompt, placed before the first user message\n"
        "      --chat-file F     chat: continue the conversation in F, a JSON object\n"
        "                        {\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}]}\n"
        "                        (a final assistant message is closed, and the user speaks next, unless it\n"
        "                        has \"prefix\": true or the file \"continue_final_message\": true)\n"
        "sampling, applied in this order:\n"
        "      --repeat-penalty R  recent tokens' logits divided by R (multiplied if negative); 1 = off (default)\n"
        "      --repeat-last-n N   tokens that count as recent, prompt included (default 64)\n"
        "  -t, --temp T          temperature, 0 = greedy and nothing below applies (default 1.0)\n"
        "      --top-k K         keep the K most likely tokens, 0 = off (default)\n"
        "      --min-p P         keep tokens at least P times as likely as the best, 0 = off (default)\n"
        "  -p, --top-p P         keep the fewest most likely tokens holding P of the mass, 1 = off (default 0.9)\n"
        "  -s, --seed N          random seed (default: from the clock, printed to stderr)\n"
        "      --stop STR        end the reply where STR appears, not printing it (repeatable)\n"
        "      --session F       keep the tokens and KV cache in F after the run; a later run of the same\n"
        "                        model whose prompt or conversation starts with them reuses their keys\n"
        "                        and values and runs only the rest\n"
        "output and speed:\n"
        "  -q, --quiet           print only the generated text (errors still go to stderr)\n"
        "      --threads N       threads (most: the CPUs this process may run on; default: those, or of\n"
        "                        a hybrid CPU's, its performance cores)\n"
        "      --mem SIZE        memory for the weights and working buffers, the KV cache aside (e.g. 12G):\n"
        "                        a larger model keeps its experts in a cache that fits, read from the\n"
        "                        file as needed (default: the memory available, when the model is larger)\n"
        "      --cache-policy P  which expert the cache drops: lru (least recently used, default) or usage\n"
        "                        (least often used lately)\n"
        "      --mmap            map the model file instead of reading it into memory: starts at once,\n"
        "                        shares the page cache, runs slower (default: read it in if it fits)\n"
        "      --no-mmap         read the model into memory even if it looks too big to fit\n"
        "      --chunk N         prompt tokens processed together, each expert once per chunk (default 128)\n"
        "      --experts-per-token N  run each token through N experts instead of the model's top-k\n"
        "                        (fewer: faster, and less exact; make quality measures it)\n"
        "      --kv TYPE         how the KV cache holds keys and values: f32, bf16, q8 or q4 (rotated;\n"
        "                        q8 a quarter of f32's memory, q4 a seventh; default q8)\n"
        "      --bf16-activations  bf16 weights multiply activations rounded to bf16 (AVX512-BF16's\n"
        "                        vdpbf16ps: faster prompts, not exact; make quality measures it)\n"
        "      --info            print the model's configuration and exit\n"
        "      --expert-stats    after each reply, print per-layer expert usage and routing entropy\n"
        "      --trace-experts   after each reply, print each token's experts and weights per layer\n"
        "      --bench           time a 128-token prompt, 64 greedy tokens and 64 sampled ones (with the\n"
        "                        sampling options above); ends with a JSON line\n"
        "      --bench-depth     --bench, then a 512-token prompt, decoding after 1024, 4096, 16384 and 32768\n"
        "                        tokens and a 512-token prompt after 8192 (-c 32800 unless given)\n"
        "      --perplexity F    perplexity over text file F, in windows of -c tokens, each from BOS\n"
        "      --kl-base OUT     with --perplexity: save every position's log-probabilities to OUT\n"
        "      --kl-divergence B with --perplexity: KL divergence from, and top-1 agreement with, base file B\n"
        "      --imatrix OUT     with --perplexity: save each matrix's mean squared input activations, per\n"
        "                        column, for export.py --imatrix (q3 and q2 round where it matters least)\n"
        "test hooks:\n"
        "      --chat-ids-file F print the token ids (BOS included) conversation F formats to, and exit\n"
        "      --tokenize-file F print the ids of file F's bytes (no BOS) and exit\n"
        "      --detokenize IDS  print the text of space-separated ids and exit\n"
        "      --ids 1,415,2936  run these token ids instead of a prompt\n"
        "      --dump-logits F   with --ids: write logits after every position, f32 (n, vocab)\n"
        "      --dump-experts F  with --ids: write chosen experts, int32 (n, layers, top_k)\n");
}

static long parse_int(const char *flag, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (end == v || *end || errno || x < lo || x > hi) die("%s: expected an integer in %ld..%ld, got \"%s\"", flag, lo, hi, v);
    return x;
}

// "1.5G", "800M", "4096K" or bytes (K, M, G, T: powers of 1024).
static uint64_t parse_size(const char *flag, const char *v) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    const char *units = "KMGT", *u = *end ? strchr(units, *end) : NULL;
    if (end == v || errno || !(x > 0) || (*end && (!u || end[1])) || x > 1e15)
        die("%s: expected a size such as 12G, 800M or a number of bytes, got \"%s\"", flag, v);
    if (u) for (const char *k = units; k <= u; k++) x *= 1024;
    if (x > 1e18) die("%s: %s is too large", flag, v);
    return (uint64_t)x;
}

static float parse_float(const char *flag, const char *v, float lo, float hi) {
    char *end;
    errno = 0;
    float x = strtof(v, &end);
    if (end == v || *end || errno || !(x >= lo && x <= hi)) die("%s: expected a number in %g..%g, got \"%s\"", flag, lo, hi, v);
    return x;
}

// Everything the command line sets.
typedef struct {
    const char *model_path, *prompt, *prompt_path, *ids_arg;
    const char *logits_path, *experts_path, *tokenize_path, *detokenize_ids;
    const char *ppl_path, *kl_out, *kl_in, *imatrix_out;
    const char *mode, *system, *chat_path, *chat_ids_path;
    int context, threads, info, do_bench, bench_depth, chunk, seeded, chatting, cache_policy, kv_type, experts_per_tok;
    int bf16_activations;
    LoadMode load_mode;
    uint64_t seed, mem;
    RunOptions run;
    Sampler sampler;
} Options;

// Reads argv into o, or dies saying what is wrong. Returns 1 when the work is
// done (-h, --version: printed), 0 when the program goes on. o->run.stop
// points into argv, in an array the caller frees.
static int parse_options(int argc, char **argv, Options *o) {
    memset(o, 0, sizeof(*o));
    o->chunk = 128;
    o->kv_type = KV_Q8;
    o->load_mode = LOAD_AUTO;
    o->run.steps = 256;
    o->sampler = (Sampler){.temperature = 1.0f, .top_p = 0.9f, .repeat_penalty = 1.0f, .repeat_last_n = 64};
    o->seed = (uint64_t)time(NULL);
    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) { print_usage(stdout); return 1; }
    if (argc >= 2 && !strcmp(argv[1], "--version")) {
        printf("mixtral.c %s, model file format %d, kernels %s\n", PROGRAM_VERSION, MODEL_VERSION, kernels_simd_name);
        return 1;
    }
    if (argc < 2 || argv[1][0] == '-') { print_usage(stderr); die("the first argument must be a model file"); }
    o->model_path = o->run.model_path = argv[1];
    o->run.stop = xcalloc(argc, sizeof(char *));
    Sampler *sm = &o->sampler;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--info")) { o->info = 1; continue; }
        if (!strcmp(a, "--bench")) { o->do_bench = 1; continue; }
        if (!strcmp(a, "--bench-depth")) { o->do_bench = o->bench_depth = 1; continue; }
        if (!strcmp(a, "--expert-stats")) { o->run.stats = 1; continue; }
        if (!strcmp(a, "--trace-experts")) { o->run.trace = 1; continue; }
        if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) { o->run.quiet = 1; continue; }
        if (!strcmp(a, "--mmap")) { o->load_mode = LOAD_MMAP; continue; }
        if (!strcmp(a, "--bf16-activations")) { o->bf16_activations = 1; continue; }
        if (!strcmp(a, "--no-mmap")) { o->load_mode = LOAD_READ; continue; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { print_usage(stdout); return 1; }
        if (i + 1 >= argc) { print_usage(stderr); die("%s needs a value", a); }
        const char *v = argv[++i];
        if (!strcmp(a, "-i") || !strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) o->prompt_path = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--steps")) o->run.steps = (int)parse_int(a, v, 0, INT_MAX);
        else if (!strcmp(a, "-t") || !strcmp(a, "--temp")) sm->temperature = parse_float(a, v, 0.0f, 100.0f);
        else if (!strcmp(a, "-p") || !strcmp(a, "--top-p")) sm->top_p = parse_float(a, v, 0.0f, 1.0f);
        else if (!strcmp(a, "--top-k")) sm->top_k = (int)parse_int(a, v, 0, INT_MAX);
        else if (!strcmp(a, "--min-p")) sm->min_p = parse_float(a, v, 0.0f, 1.0f);
        else if (!strcmp(a, "--repeat-penalty")) sm->repeat_penalty = parse_float(a, v, 1e-3f, 1e3f);
        else if (!strcmp(a, "--repeat-last-n")) sm->repeat_last_n = (int)parse_int(a, v, 0, 1 << 20);
        else if (!strcmp(a, "--stop")) {
            if (!*v) die("--stop: the stop string is empty");
            o->run.stop[o->run.n_stop++] = v;
        }
        else if (!strcmp(a, "-s") || !strcmp(a, "--seed")) { o->seed = (uint64_t)parse_int(a, v, 0, LONG_MAX); o->seeded = 1; }
        else if (!strcmp(a, "-c") || !strcmp(a, "--context")) o->context = (int)parse_int(a, v, 1, INT_MAX);
        else if (!strcmp(a, "-m") || !strcmp(a, "--mode")) o->mode = v;
        else if (!strcmp(a, "-y") || !strcmp(a, "--system")) o->system = v;
        else if (!strcmp(a, "--chat-file")) o->chat_path = v;
        else if (!strcmp(a, "--chat-ids-file")) o->chat_ids_path = v;
        else if (!strcmp(a, "--threads")) o->threads = (int)parse_int(a, v, 1, 1024);
        else if (!strcmp(a, "--mem")) o->mem = parse_size(a, v);
        else if (!strcmp(a, "--cache-policy")) {
            if (strcmp(v, "lru") && strcmp(v, "usage")) die("--cache-policy: expected lru or usage, got \"%.40s\"", v);
            o->cache_policy = !strcmp(v, "usage") ? EXPERT_CACHE_USAGE : EXPERT_CACHE_LRU;
        }
        else if (!strcmp(a, "--chunk")) o->chunk = (int)parse_int(a, v, 1, 4096);
        else if (!strcmp(a, "--experts-per-token")) o->experts_per_tok = (int)parse_int(a, v, 1, 1 << 12);
        else if (!strcmp(a, "--kv")) {
            int t = 0;
            while (t < KV_NTYPES && strcmp(v, kv_type_name[t])) t++;
            if (t == KV_NTYPES) die("--kv: expected f32, bf16, q8 or q4, got \"%.40s\"", v);
            o->kv_type = t;
        }
        else if (!strcmp(a, "--ids")) o->ids_arg = v;
        else if (!strcmp(a, "--dump-logits")) o->logits_path = v;
        else if (!strcmp(a, "--dump-experts")) o->experts_path = v;
        else if (!strcmp(a, "--perplexity")) o->ppl_path = v;
        else if (!strcmp(a, "--kl-base")) o->kl_out = v;
        else if (!strcmp(a, "--kl-divergence")) o->kl_in = v;
        else if (!strcmp(a, "--session")) o->run.session = v;
        else if (!strcmp(a, "--imatrix")) o->imatrix_out = v;
        else if (!strcmp(a, "--tokenize-file")) o->tokenize_path = v;
        else if (!strcmp(a, "--detokenize")) o->detokenize_ids = v;
        else { print_usage(stderr); die("unknown option %s", a); }
    }
    // options that contradict each other, or that the chosen mode would ignore
    const char *mode = o->mode;
    if (mode && strcmp(mode, "generate") && strcmp(mode, "chat")) die("-m: mode must be generate or chat, got \"%s\"", mode);
    o->chatting = mode && !strcmp(mode, "chat");
    const char *other = o->do_bench ? "--bench" : o->ppl_path ? "--perplexity" : o->ids_arg ? "--ids" : o->info ? "--info"
                      : o->chat_ids_path ? "--chat-ids-file" : o->tokenize_path ? "--tokenize-file"
                      : o->detokenize_ids ? "--detokenize" : NULL;
    if (other && mode) die("-m %s does not go with %s, which runs on its own", mode, other);
    if (o->prompt && o->prompt_path) die("-i and -f both give the prompt: choose one");
    if (o->chatting && (o->prompt || o->prompt_path))
        die("-i and -f are for -m generate; in chat, type the messages (or use --chat-file)");
    if (!o->chatting && (o->system || o->chat_path)) die("%s needs -m chat", o->system ? "-y" : "--chat-file");
    if (o->system && o->chat_path) die("-y and --chat-file both give the system prompt: put it in the file as a system message");
    if ((o->logits_path || o->experts_path) && !o->ids_arg) die("--dump-logits and --dump-experts need --ids");
    if ((o->kl_out || o->kl_in || o->imatrix_out) && !o->ppl_path)
        die("--kl-base, --kl-divergence and --imatrix need --perplexity FILE (the text)");
    return 0;
}

#ifndef MIXTRAL_NO_MAIN
// --info: the header, in the names of config.json.
static void print_info(const Config *p) {
    printf("weights %s, dim %d, hidden_dim %d, layers %d, heads %d, kv heads %d, head_dim %d,\n"
           "experts %d, experts per token %d, vocab %d, max positions %d, sliding window %d, rope_theta %g, eps %g\n",
           weight_type_name[p->weight_type], p->dim, p->hidden_dim, p->n_layers, p->n_heads, p->n_kv_heads,
           p->head_dim, p->n_experts, p->n_experts_per_tok, p->vocab_size, p->max_seq_len, p->sliding_window,
           p->rope_theta, p->rms_norm_eps);
    printf("matrix types:");
    for (int k = 0; k < N_KINDS; k++) printf(" %s %s", kind_name[k], weight_type_name[p->matrix_type[k]]);
    printf("\n");
}

int main(int argc, char **argv) {
    Options o;
    if (parse_options(argc, argv, &o)) return 0;
    catch_bus_errors();
    double t_load = time_s();
    Model model;
    // what only looks at the header or the tokenizer maps the file; runs read it in when it fits
    int quick = o.info || o.chat_ids_path || o.tokenize_path || o.detokenize_ids;
    if (o.threads == 0) o.threads = pool_default_threads();
#ifndef MIXTRAL_OVERSUBSCRIBE // (a test-only build: tests/test_engine.py checks that any thread count gives the same numbers)
    int cpus = pool_usable_cpus();
    if (o.threads > cpus) { // more threads than CPUs only wait for each other at every round of the pool
        if (!o.run.quiet)
            fprintf(stderr, "mixtral: --threads %d is more than the %d CPUs this process may use; running %d\n", o.threads,
                    cpus, cpus);
        o.threads = cpus;
    }
#endif
    ThreadPool pool; // reads the model in, then runs it
    if (pool_init(&pool, o.threads) != 0) die("cannot start %d threads (try fewer with --threads)", o.threads);
    model_load(&model, o.model_path, quick ? LOAD_MMAP : o.load_mode, &pool, quick ? 0 : o.mem, o.context, o.chunk,
               o.kv_type, o.cache_policy);
    t_load = time_s() - t_load;
    const Config *p = &model.config;
    int status = 0;
    char *prompt_text = NULL;
    State state = {0};
    if (quick) {
        if (o.info) print_info(p);
        if (o.chat_ids_path) eval_chat_ids(&model, o.chat_ids_path);
        if (o.tokenize_path) eval_tokenize_file(&model.tokenizer, o.tokenize_path);
        if (o.detokenize_ids) eval_detokenize(&model.tokenizer, o.detokenize_ids);
        goto done;
    }
    if (o.context == 0 && o.bench_depth) o.context = 32768 + 32; // the depths it measures
    if (o.context == 0) o.context = p->max_seq_len < 4096 ? p->max_seq_len : 4096;
    if (o.experts_per_tok) { // the router's top-k, changed for this run (the weights stay as they are)
        if (o.experts_per_tok > p->n_experts)
            die("--experts-per-token %d: the model has %d experts", o.experts_per_tok, p->n_experts);
        model.config.n_experts_per_tok = o.experts_per_tok;
    }
    if (o.kv_type == KV_Q4 && p->head_dim % 32)
        die("--kv q4 needs a head_dim that is a multiple of 32 (this model's is %d): use --kv q8", p->head_dim);
    if (o.context > p->max_seq_len)
        fprintf(stderr, "mixtral: warning: -c %d is beyond the %d positions the model was trained for; "
                        "expect worse text past %d\n", o.context, p->max_seq_len, p->max_seq_len);

    // the prompt: -i, -f FILE or -f - (standard input)
    size_t prompt_len = o.prompt ? strlen(o.prompt) : 0;
    if (o.prompt_path) {
        o.prompt = prompt_text = read_file(o.prompt_path, &prompt_len);
        if (prompt_len && o.prompt[prompt_len - 1] == '\n') prompt_len--; // the newline that ends a file
    }
    int running = !o.do_bench && !o.ppl_path && !o.ids_arg;
    if (running && !o.run.quiet) {
        double rss = resident_mb();
        double kv_mb = kv_cache_bytes(p, o.context, o.kv_type) / 1e6;
        fprintf(stderr, "mixtral: loaded %s (%s, %.2f GB, %s) in %.2f s, %.0f MB resident; %d threads, context %d, "
                        "KV cache %s %.0f MB\n",
                o.model_path, weight_type_name[p->weight_type], model.map_size / 1e9,
                model.in_memory ? "read into memory" : "mapped", t_load,
                rss >= 0 ? rss : peak_resident_mb(), o.threads, o.context, kv_type_name[o.kv_type], kv_mb);
        if (!o.seeded && o.sampler.temperature > 0) fprintf(stderr, "mixtral: seed %llu (-s repeats this run)\n", (unsigned long long)o.seed);
    }

    state_init(&state, p, o.context, o.chunk, o.kv_type, o.bf16_activations, &pool);
    state.expert_cache = model.expert_cache;
    o.sampler.rng = o.seed;
    sampler_init(&o.sampler, p->vocab_size);
    if (o.do_bench) {
        bench(&model, &state, &o.sampler, o.threads, o.bench_depth);
    } else if (o.ppl_path) {
        eval_perplexity(&model, &state, o.model_path, o.ppl_path, o.kl_out, o.kl_in, o.imatrix_out);
    } else if (o.ids_arg) {
        IdList ids = parse_ids("--ids", o.ids_arg, p->vocab_size);
        if (ids.n == 0) die("--ids: no token ids given");
        if (!o.logits_path) die("--ids needs --dump-logits");
        eval_dump_logits(&model, &state, o.model_path, ids.ids, ids.n, o.logits_path, o.experts_path);
        free(ids.ids);
    } else {
        catch_interrupts(1);
        if (o.chatting) chat(&model, &state, &o.sampler, o.system, o.chat_path, &o.run);
        else status = generate(&model, &state, &o.sampler, o.prompt ? o.prompt : "", prompt_len, &o.run);
    }
    sampler_free(&o.sampler);
    state_free(&state, p);
done:
    free(prompt_text);
    free(o.run.stop);
    pool_free(&pool);
    model_free(&model);
    return status;
}
#endif
