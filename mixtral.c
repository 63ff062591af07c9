// mixtral.c: inference for Mixtral sparse mixture-of-experts models, in plain C.
//
//   make && ./mixtral model.bin -i "Once upon a time"
//
// One file, in the order a token flows through the model:
//   1. utilities            die(), timing
//   2. the model file       header, validation, weight pointers (mirrors export.py)
//   3. thread pool          persistent pthreads, caller is worker 0
//   4. kernels              rmsnorm, matmul (weight formats dispatched here), softmax
//   5. state and KV cache   the ring buffer for sliding-window attention
//   6. forward pass         attention, then the mixture of experts: route() and moe()
//   7. sampler              greedy, temperature, top-p
//   8. generation and chat  text in, text out; Mistral's instruct format; --expert-stats
//   9. command line
//
// Tokens go through the model in chunks (forward_chunk): a prompt many at a
// time, so that each expert's weights are read once per chunk, and decoding one
// at a time, which is the same code with a chunk of one.
//
// Names follow Hugging Face's modeling_mixtral.py and config.json so the two can
// be read side by side: dim = hidden_size, hidden_dim = intermediate_size,
// wq/wk/wv/wo = q/k/v/o_proj, gate = the router, w1/w2/w3 = an expert's matrices.
// Dimension letters: D = dim, H = hidden_dim, Q = n_heads*head_dim,
// KV = n_kv_heads*head_dim, E = n_experts, K = top_k, V = vocab_size,
// S = KV-cache slots, C = tokens in a chunk.

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "tokenizer.h"

#if defined(__AVX2__) && defined(__FMA__) // the kernels' instruction sets, chosen at build time
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

// ----------------------------------------------------------------------------
// 1. utilities

// The one way out on bad input: say what was wrong and what to do, exit non-zero.
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("mixtral: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) die("out of memory allocating %zu x %zu bytes (try a smaller -c)", n, size);
    return p;
}

// Reads a whole file (any bytes) into a malloc'd buffer.
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = xcalloc(cap, 1);
    for (;;) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        cap *= 2;
        if (!(buf = realloc(buf, cap))) die("out of memory reading %s", path);
    }
    if (ferror(f)) die("cannot read %s: %s", path, strerror(errno));
    fclose(f);
    *len = n;
    return buf;
}

static double time_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// ----------------------------------------------------------------------------
// 2. the model file (written by export.py; the layout is documented there)
//
//   header (256 bytes) | tokenizer | weights (4096-aligned, each tensor 64-aligned)
//
// Tensor order, the same as export.py's tensor_plan():
//   embed (V,D)
//   per layer: attn_norm (D,) wq (Q,D) wk (KV,D) wv (KV,D) wo (D,Q)
//              ffn_norm (D,) gate (E,D) f32
//              per expert: w1 (H,D) w3 (H,D) w2 (D,H)
//   norm (D,) lm_head (V,D)
// Norms and the router are always f32; the other matrices have the file's weight
// type, except that a q4 file keeps embed and lm_head in q8 (export.py says why).
// A row of a quantized matrix is its quantized weights followed by its scales,
// one f32 per group of QGROUP = 64 weights: q8 is int8 q with w = q * scale; q4 packs 64
// weights in 32 bytes (byte i: weight i in the low nibble, weight i+32 in the
// high one) as u in 0..15 with w = (u - 8) * scale.

#define MODEL_MAGIC "MIXTRALC"
#define MODEL_VERSION 3
#define QGROUP 64 // q8/q4: weights per scale (the header's group_size must say 64)
#define HEADER_SIZE 256
#define WEIGHTS_ALIGN 4096
#define TENSOR_ALIGN 64

enum { WEIGHT_F32 = 0, WEIGHT_BF16 = 1, WEIGHT_Q8 = 2, WEIGHT_Q4 = 3, WEIGHT_NTYPES };
static const char *weight_type_name[] = {"f32", "bf16", "q8", "q4"};

typedef struct {
    char magic[8];          // "MIXTRALC"
    uint32_t version;       // MODEL_VERSION
    uint32_t header_size;   // HEADER_SIZE
    uint32_t weight_type;   // WEIGHT_*: the type of every matrix except the router
    uint32_t group_size;    // q8/q4: weights per scale, QGROUP (0 for float types)
    int32_t dim;            // hidden_size
    int32_t hidden_dim;     // intermediate_size (one expert's)
    int32_t n_layers;       // num_hidden_layers
    int32_t n_heads;        // num_attention_heads
    int32_t n_kv_heads;     // num_key_value_heads
    int32_t head_dim;
    int32_t n_experts;      // num_local_experts
    int32_t top_k;          // num_experts_per_tok
    int32_t vocab_size;
    int32_t max_seq_len;    // max_position_embeddings
    int32_t sliding_window; // 0: full causal attention
    int32_t bos_id, eos_id;
    int32_t reserved;
    float rope_theta;
    float rms_norm_eps;
    uint64_t tokenizer_offset, tokenizer_size;
    uint64_t weights_offset;
    uint64_t file_size;
} Config;
_Static_assert(sizeof(Config) == 120, "Config must match export.py's HEADER_FORMAT");

// A weight matrix W (rows, cols), row-major, stored in one of the weight types.
typedef struct {
    const void *data;    // f32 or bf16 values, or q8/q4 rows of quantized weights and scales
    int type;            // WEIGHT_*
    int rows, cols;
    size_t row_bytes;    // bytes from one row to the next
} Matrix;

typedef struct {
    Matrix w1, w3;  // (H,D): gate and up projections
    Matrix w2;      // (D,H): down projection
} Expert;

typedef struct {
    const float *attn_norm; // (D,) input_layernorm
    Matrix wq, wk, wv, wo;  // (Q,D) (KV,D) (KV,D) (D,Q)
    const float *ffn_norm;  // (D,) post_attention_layernorm
    const float *gate;      // (E,D) the router, always f32
    Expert *experts;        // (E,)
} Layer;

typedef struct {
    Matrix embed;           // (V,D) embed_tokens
    Layer *layers;          // (n_layers,)
    const float *norm;      // (D,) final norm
    Matrix lm_head;         // (V,D)
} Weights;

typedef struct {
    Config config;
    Weights weights;
    Tokenizer tokenizer;
    const uint8_t *map;     // the whole file, memory-mapped read-only
    uint64_t map_size;
} Model;

// Bytes of one row: the weights, and for q8/q4 the row's scales after them.
static uint64_t row_bytes(int type, uint64_t cols) {
    switch (type) {
    case WEIGHT_F32: return cols * 4;
    case WEIGHT_BF16: return cols * 2;
    case WEIGHT_Q8: return cols + cols / QGROUP * 4;
    default: return cols / 2 + cols / QGROUP * 4;
    }
}

// Walks the tensor order once; with map == NULL it only measures. Every step
// is checked for overflow so a corrupt header cannot wrap the arithmetic.
typedef struct {
    const uint8_t *map;
    uint64_t off;
    int overflow;
} Cursor;

static const void *cursor_take(Cursor *c, uint64_t bytes) {
    uint64_t start = (c->off + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
    if (start < c->off || start + bytes < start) { c->overflow = 1; return NULL; }
    c->off = start + bytes;
    return c->map ? c->map + start : NULL;
}

static Matrix cursor_matrix(Cursor *c, int type, int rows, int cols) {
    Matrix m = {NULL, type, rows, cols, row_bytes(type, cols)};
    m.data = cursor_take(c, m.row_bytes * rows);
    return m;
}

static const float *cursor_f32(Cursor *c, uint64_t n) {
    return (const float *)cursor_take(c, n * 4);
}

// Returns the file offset just past the last tensor (the file size it implies).
static uint64_t model_map_weights(const Config *p, Weights *w, const uint8_t *map) {
    Cursor c = {map, p->weights_offset, 0};
    int t = p->weight_type, D = p->dim, H = p->hidden_dim, E = p->n_experts;
    int Q = p->n_heads * p->head_dim, KV = p->n_kv_heads * p->head_dim;
    int edge = t == WEIGHT_Q4 ? WEIGHT_Q8 : t; // embed and lm_head
    w->embed = cursor_matrix(&c, edge, p->vocab_size, D);
    for (int l = 0; l < p->n_layers; l++) {
        Layer *L = &w->layers[l];
        L->attn_norm = cursor_f32(&c, D);
        L->wq = cursor_matrix(&c, t, Q, D);
        L->wk = cursor_matrix(&c, t, KV, D);
        L->wv = cursor_matrix(&c, t, KV, D);
        L->wo = cursor_matrix(&c, t, D, Q);
        L->ffn_norm = cursor_f32(&c, D);
        L->gate = cursor_f32(&c, (uint64_t)E * D);
        for (int e = 0; e < E; e++) {
            L->experts[e].w1 = cursor_matrix(&c, t, H, D);
            L->experts[e].w3 = cursor_matrix(&c, t, H, D);
            L->experts[e].w2 = cursor_matrix(&c, t, D, H);
        }
    }
    w->norm = cursor_f32(&c, D);
    w->lm_head = cursor_matrix(&c, edge, p->vocab_size, D);
    return c.overflow ? UINT64_MAX : c.off;
}

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
    int quantized = p->weight_type == WEIGHT_Q8 || p->weight_type == WEIGHT_Q4;
    if (quantized ? p->group_size != QGROUP : p->group_size != 0)
        die("%s: corrupt header: group size %u for weight type %s; %s", path, p->group_size,
            weight_type_name[p->weight_type], hint);
    // Bounds keep every product below 2^62: no overflow in the size arithmetic.
    struct { const char *name; int32_t v, max; } dims[] = {
        {"dim", p->dim, 1 << 20}, {"hidden_dim", p->hidden_dim, 1 << 22}, {"n_layers", p->n_layers, 1 << 12},
        {"n_heads", p->n_heads, 1 << 12}, {"n_kv_heads", p->n_kv_heads, 1 << 12},
        {"head_dim", p->head_dim, 1 << 14}, {"n_experts", p->n_experts, 1 << 12},
        {"top_k", p->top_k, 1 << 12}, {"vocab_size", p->vocab_size, 1 << 24},
        {"max_seq_len", p->max_seq_len, INT32_MAX},
    };
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++)
        if (dims[i].v <= 0 || dims[i].v > dims[i].max)
            die("%s: corrupt header: %s = %d (must be 1..%d); %s", path, dims[i].name, dims[i].v, dims[i].max, hint);
    if (p->n_heads % p->n_kv_heads)
        die("%s: corrupt header: n_heads %d is not a multiple of n_kv_heads %d; %s", path, p->n_heads, p->n_kv_heads, hint);
    if (quantized && (p->dim % p->group_size || p->hidden_dim % p->group_size || (p->n_heads * p->head_dim) % p->group_size))
        die("%s: corrupt header: dimensions are not multiples of the group size %u; %s", path, p->group_size, hint);
    if (p->head_dim % 2) die("%s: corrupt header: head_dim %d is odd (RoPE needs pairs); %s", path, p->head_dim, hint);
    if (p->top_k > p->n_experts)
        die("%s: corrupt header: top_k %d > n_experts %d; %s", path, p->top_k, p->n_experts, hint);
    if (p->sliding_window < 0) die("%s: corrupt header: sliding_window %d; %s", path, p->sliding_window, hint);
    if (p->bos_id < 0 || p->bos_id >= p->vocab_size || p->eos_id < 0 || p->eos_id >= p->vocab_size)
        die("%s: corrupt header: bos/eos ids %d/%d outside the vocabulary; %s", path, p->bos_id, p->eos_id, hint);
    if (!(p->rope_theta > 0) || !isfinite(p->rope_theta) || !(p->rms_norm_eps > 0) || !isfinite(p->rms_norm_eps))
        die("%s: corrupt header: rope_theta %g, rms_norm_eps %g; %s", path, p->rope_theta, p->rms_norm_eps, hint);
    if (p->tokenizer_offset != HEADER_SIZE || p->tokenizer_size > file_size ||
        p->weights_offset < p->tokenizer_offset + p->tokenizer_size || p->weights_offset % WEIGHTS_ALIGN)
        die("%s: corrupt header: section offsets; %s", path, hint);
    if (p->file_size != file_size)
        die("%s is %llu bytes but its header says %llu: truncated copy or interrupted export? %s", path,
            (unsigned long long)file_size, (unsigned long long)p->file_size, hint);
}

static void model_load(Model *m, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model file %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s is not a regular file", path);
    uint64_t size = (uint64_t)st.st_size;
    if (size < HEADER_SIZE) die("%s is %llu bytes, too small to be a model file; re-run export.py", path, (unsigned long long)size);
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) die("cannot mmap %s: %s", path, strerror(errno));
    m->map = map;
    m->map_size = size;
    memcpy(&m->config, map, sizeof(Config));
    const Config *p = &m->config;
    config_validate(p, size, path);

    // Measure the weights section first, then point into it.
    Weights *w = &m->weights;
    w->layers = xcalloc(p->n_layers, sizeof(Layer));
    for (int l = 0; l < p->n_layers; l++) w->layers[l].experts = xcalloc(p->n_experts, sizeof(Expert));
    uint64_t end = model_map_weights(p, w, NULL);
    if (end != size)
        die("%s: the header's dimensions imply %llu bytes of file, the file has %llu; corrupt header? re-run export.py",
            path, (unsigned long long)end, (unsigned long long)size);
    model_map_weights(p, w, m->map);

    const char *err = tokenizer_init(&m->tokenizer, m->map + p->tokenizer_offset, p->tokenizer_size, p->vocab_size);
    if (err) die("%s: tokenizer section: %s; re-run export.py", path, err);
}

static void model_free(Model *m) {
    for (int l = 0; l < m->config.n_layers; l++) free(m->weights.layers[l].experts);
    free(m->weights.layers);
    tokenizer_free(&m->tokenizer);
    munmap((void *)m->map, m->map_size);
}

// ----------------------------------------------------------------------------
// 3. thread pool
//
// Persistent workers; the calling thread is worker 0, so n threads means n-1
// pthreads. A job is a function called as fn(arg, tid, n) on every worker,
// which takes a share of the work: a fixed one by tid, its own contiguous
// share with stealing at the end (pool_share, for decoding), or (for batches
// of products) the next free piece. Every output element is computed by exactly
// one worker with the same arithmetic whichever worker it is, so results
// depend neither on timing nor on the thread count.
//
// Jobs come in quick succession while a token is computed (a few per layer),
// so a waiting thread first spins briefly on an atomic counter, then sleeps on
// a condition variable: between tokens and while the user types, idle
// workers hold no core.

#define POOL_SPIN 20000 // polls before sleeping, roughly 50-100 microseconds

typedef void (*PoolFn)(void *arg, int tid, int n);

// A worker's share of a job's blocks, [front, back) in one atomic word (pool_share)
struct Share { _Alignas(64) _Atomic uint64_t span; }; // front << 32 | back

typedef struct {
    int n;                      // threads, the caller included
    pthread_t *threads;         // (n-1,)
    PoolFn fn;                  // the current job, published by the release store to round
    void *arg;
    _Alignas(64) _Atomic uint64_t round; // bumped once per job; workers wait for a new value
    _Alignas(64) _Atomic int pending;    // workers still running this round
    _Alignas(64) pthread_mutex_t mu;     // guards the sleeping counts and the condition variables
    pthread_cond_t wake, done;
    int sleepers;               // workers asleep on `wake`
    int caller_asleep;          // the caller asleep on `done`
    _Atomic int quit;           // set before the last bump of round: workers exit
    struct Share *shares;       // (n,) one per worker
} ThreadPool;

typedef struct { ThreadPool *pool; int tid; } WorkerArg;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void *pool_worker(void *p) {
    WorkerArg *wa = p;
    ThreadPool *pool = wa->pool;
    uint64_t seen = 0;
    for (;;) {
        uint64_t r = atomic_load_explicit(&pool->round, memory_order_acquire);
        for (int spin = 0; r == seen && spin < POOL_SPIN; spin++) {
            cpu_relax();
            r = atomic_load_explicit(&pool->round, memory_order_acquire);
        }
        if (r == seen) { // nothing came: sleep until the caller bumps round
            pthread_mutex_lock(&pool->mu);
            pool->sleepers++;
            while ((r = atomic_load(&pool->round)) == seen) pthread_cond_wait(&pool->wake, &pool->mu);
            pool->sleepers--;
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->quit)) break;
        seen = r;
        pool->fn(pool->arg, wa->tid, pool->n);
        if (atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool->mu); // the last one out wakes the caller if it sleeps
            if (pool->caller_asleep) pthread_cond_signal(&pool->done);
            pthread_mutex_unlock(&pool->mu);
        }
    }
    free(wa);
    return NULL;
}

static void pool_init(ThreadPool *pool, int n) {
    memset(pool, 0, sizeof(*pool));
    pool->n = n;
    atomic_init(&pool->round, 0);
    atomic_init(&pool->pending, 0);
    atomic_init(&pool->quit, 0);
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    pool->threads = xcalloc(n, sizeof(pthread_t));
    pool->shares = aligned_alloc(64, n * sizeof(struct Share));
    if (!pool->shares) die("out of memory");
    for (int i = 1; i < n; i++) {
        WorkerArg *wa = xcalloc(1, sizeof(WorkerArg));
        wa->pool = pool;
        wa->tid = i;
        if (pthread_create(&pool->threads[i - 1], NULL, pool_worker, wa) != 0) die("cannot start thread %d", i);
    }
}

// Runs fn(arg, tid, n) on all n threads and returns when every one has finished.
static void pool_run(ThreadPool *pool, PoolFn fn, void *arg) {
    if (pool->n == 1) { fn(arg, 0, 1); return; }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store_explicit(&pool->pending, pool->n - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool->round, 1, memory_order_release);
    pthread_mutex_lock(&pool->mu);
    if (pool->sleepers) pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    fn(arg, 0, pool->n);
    for (int spin = 0; atomic_load_explicit(&pool->pending, memory_order_acquire) > 0 && spin < POOL_SPIN; spin++)
        cpu_relax();
    if (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0) {
        pthread_mutex_lock(&pool->mu);
        pool->caller_asleep = 1;
        while (atomic_load(&pool->pending) > 0) pthread_cond_wait(&pool->done, &pool->mu);
        pool->caller_asleep = 0;
        pthread_mutex_unlock(&pool->mu);
    }
}

static void pool_free(ThreadPool *pool) {
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->quit, 1);
    atomic_fetch_add(&pool->round, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n; i++) pthread_join(pool->threads[i - 1], NULL);
    free(pool->threads);
    free(pool->shares);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->wake);
    pthread_cond_destroy(&pool->done);
}

// The share [*start, *end) of `total` items that worker tid of n takes.
static void split_range(int total, int tid, int n, int *start, int *end) {
    *start = (int)((int64_t)total * tid / n);
    *end = (int)((int64_t)total * (tid + 1) / n);
}

// Shares with stealing: `blocks` items are dealt out as n contiguous shares,
// one per worker, which each worker takes from the front, one block at a
// time, in order. A worker whose share is done takes blocks from the back of
// the others'. So each worker reads memory in one sequential stream, as with
// fixed shares, yet a worker slowed down (another process on its core) does
// not leave the others waiting for it. A share's [front, back) is one atomic
// word, so that each block is taken by exactly one worker.

// Called before the job is run (pool_run publishes the shares to the workers).
static void pool_share(ThreadPool *pool, int64_t blocks) {
    for (int t = 0; t < pool->n; t++) {
        uint64_t front = (uint64_t)(blocks * t / pool->n), back = (uint64_t)(blocks * (t + 1) / pool->n);
        atomic_store_explicit(&pool->shares[t].span, front << 32 | back, memory_order_relaxed);
    }
}

static int64_t share_take(struct Share *sh, int from_back) {
    uint64_t v = atomic_load_explicit(&sh->span, memory_order_relaxed);
    for (;;) {
        uint64_t front = v >> 32, back = v & 0xFFFFFFFFu;
        if (front >= back) return -1;
        uint64_t next = from_back ? v - 1 : v + (1ull << 32);
        if (atomic_compare_exchange_weak_explicit(&sh->span, &v, next, memory_order_relaxed, memory_order_relaxed))
            return (int64_t)(from_back ? back - 1 : front);
    }
}

// The next block for worker tid: from its own share, else stolen; -1: all taken.
static int64_t pool_next_block(ThreadPool *pool, int tid) {
    int64_t b = share_take(&pool->shares[tid], 0);
    for (int k = 1; b < 0 && k < pool->n; k++) b = share_take(&pool->shares[(tid + k) % pool->n], 1);
    return b;
}

// ----------------------------------------------------------------------------
// 4. kernels
//
// The matrix-vector products read every active weight once per token, so they
// decide the speed. Each weight type has a dot product: a portable C version,
// always built and tested (make debug, or ARCH= on any machine), and AVX2 or
// NEON versions chosen at build time by the compiler's target macros.
// Quantized weights meet int8-quantized activations: integer multiply-adds
// within a group, one float multiply-add per group.

// out (n,) = x (n,) / rms(x) * weight (n,); out may alias x.
// modeling_mixtral.py: MixtralRMSNorm.forward
static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

// In-place softmax of x (n,), in fp32 like the reference.
static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) if (x[i] > max) max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - max); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

// silu(g) * u: one element of the experts' gate (swiglu below).
static inline float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

// Activation vectors quantized to int8 per group of QGROUP: x ~ q * scale[g].
// sum[g] is the group's sum of q * scale, which the AVX2 q4 kernel needs.
// Several vectors (the tokens of a chunk) lie one after another.
typedef struct {
    int8_t *q;       // (tokens, n)
    float *scale;    // (tokens, n/QGROUP)
    float *sum;      // (tokens, n/QGROUP)
    const float *x;  // the vectors quantized, to reuse the result for the same input
    int64_t groups;  // how many groups of QGROUP values they hold
} QuantX;

// Quantizes groups [g0, g1) of x, vectors of QGROUP values each, into qx:
// q = round(x * 127 / max|x|), to nearest, ties to even, as lrintf does. The
// AVX2 version computes the same numbers, 8 at a time.
static void quantize_groups(QuantX *qx, const float *x, int64_t g0, int64_t g1) {
    const int G = QGROUP;
    for (int64_t g = g0; g < g1; g++) {
        const float *xg = x + (size_t)g * G;
        int8_t *q = qx->q + (size_t)g * G;
        float amax = 0.0f;
        int32_t sum = 0;
#if defined(__AVX2__) && defined(__FMA__)
        __m256 v[QGROUP / 8], m = _mm256_setzero_ps();
        const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        for (int k = 0; k < G / 8; k++) m = _mm256_max_ps(m, _mm256_and_ps(v[k] = _mm256_loadu_ps(xg + 8 * k), abs_mask));
        m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
        m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0x4E));
        amax = _mm_cvtss_f32(_mm256_castps256_ps128(_mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0xB1))));
        __m256 inv = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
        __m256i total = _mm256_setzero_si256();
        for (int k = 0; k < G / 32; k++) { // 32 values: four vectors of int32 packed into 32 bytes
            __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * k], inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * k + 1], inv));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * k + 2], inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * k + 3], inv));
            total = _mm256_add_epi32(total, _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
            __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)); // lanes interleaved
            _mm256_storeu_si256((__m256i *)(q + 32 * k), _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        }
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
#else
        for (int i = 0; i < G; i++) amax = fabsf(xg[i]) > amax ? fabsf(xg[i]) : amax; // (fmaxf: a libm call)
        float inv = amax > 0 ? 127.0f / amax : 0.0f;
        for (int i = 0; i < G; i++) {
            q[i] = (int8_t)lrintf(xg[i] * inv);
            sum += q[i];
        }
#endif
        float scale = amax / 127.0f;
        qx->scale[g] = scale;
        qx->sum[g] = (float)sum * scale;
    }
}

// Token t of a quantized batch of vectors of n values each.
static inline QuantX quant_token(const QuantX *x, int t, int n) {
    int G = n / QGROUP;
    return (QuantX){x->q + (size_t)t * n, x->scale + (size_t)t * G, x->sum + (size_t)t * G, NULL, G};
}

// Quantized products of several tokens (a chunk of prompt) work on tiles of up
// to TILE_R weight rows by TILE_T tokens: each weight vector loaded serves
// every token of the tile and each input vector every row, which is what
// makes a chunk of prompt cheaper than its tokens one by one. Decoding (one
// token) uses dot products instead, which keep several accumulators per row
// for speed; the tile, short of registers, keeps one, so the two round
// differently (by about 1e-7 of the logits' range, tested). Within each kernel
// every sum is added in one fixed order, the same on any number of threads.
#define TILE_R 2
#define TILE_T 4
#define TILE_G 32 // groups whose scale products are made ahead at a time

#if defined(__AVX2__) && defined(__FMA__)
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SIMD_NAME "avx2 + avx512-vnni" // the groups' integer products, see q8_group
#elif defined(__AVX512BW__)
#define SIMD_NAME "avx2 + avx512bw"
#else
#define SIMD_NAME "avx2"
#endif
#define SIMD_TILES // quant_tile below
#define SIMD_SWIGLU // swiglu below

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static float dot_f32(const float *w, const float *x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

// bf16 is the top half of an f32: widen to 32 bits and shift left by 16.
static inline __m256 bf16x8_to_ps(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Weights are read once per token from memory far larger than the caches.
// The hardware prefetcher alone keeps too few cache misses in flight for one
// core to reach its share of the bandwidth (measured: half), so the quantized
// kernels also prefetch along their weight stream, which runs on through the
// row's scales into the next row, at two distances: PREFETCH_FAR bytes ahead
// into L2, whose miss queue is deep enough to cover the memory latency under
// load from both cores, and PREFETCH_NEAR ahead from L2 into L1, whose queue
// is not (prefetching far into L1 alone measured 10-20% slower decoding).
// Tuned on Zen 3.
#ifndef PREFETCH_FAR
#define PREFETCH_FAR 8192
#endif
#ifndef PREFETCH_NEAR
#define PREFETCH_NEAR 768
#endif
static inline void prefetch(const void *p) {
    _mm_prefetch((const char *)p + PREFETCH_FAR, _MM_HINT_T1);
    _mm_prefetch((const char *)p + PREFETCH_NEAR, _MM_HINT_T0);
}

static float dot_bf16(const uint16_t *w, const float *x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        prefetch(w + i);
        __m256i h0 = _mm256_loadu_si256((const __m256i *)(w + i));
        __m256i h1 = _mm256_loadu_si256((const __m256i *)(w + i + 16));
        a0 = _mm256_fmadd_ps(bf16x8_to_ps(_mm256_castsi256_si128(h0)), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(bf16x8_to_ps(_mm256_extracti128_si256(h0, 1)), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(bf16x8_to_ps(_mm256_castsi256_si128(h1)), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(bf16x8_to_ps(_mm256_extracti128_si256(h1, 1)), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(bf16x8_to_ps(_mm_loadu_si128((const __m128i *)(w + i))), _mm256_loadu_ps(x + i), a0);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += bf16_to_f32(w[i]) * x[i];
    return s;
}

// S[g] = ws[g] * xs[g]: the products of a weight row's and a token's group
// scales, made ahead so that the inner loops broadcast them from memory. For
// q4 (xsum given) the same pass adds sum(ws[g] * xsum[g]) into corr, for the
// offset correction below.
static inline __m256 scale_products(float *S, const float *ws, const float *xs, const float *xsum, int n, __m256 corr) {
    int g = 0;
    for (; g + 8 <= n; g += 8) {
        __m256 w = _mm256_loadu_ps(ws + g);
        _mm256_storeu_ps(S + g, _mm256_mul_ps(w, _mm256_loadu_ps(xs + g)));
        if (xsum) corr = _mm256_fmadd_ps(w, _mm256_loadu_ps(xsum + g), corr);
    }
    if (g < n) {
        float c = 0.0f;
        for (; g < n; g++) {
            S[g] = ws[g] * xs[g];
            if (xsum) c += ws[g] * xsum[g];
        }
        corr = _mm256_add_ps(corr, _mm256_setr_ps(c, 0, 0, 0, 0, 0, 0, 0));
    }
    return corr;
}

// A group's 64 int8 products (weights w0: 0..31, w1: 32..63, against x) are
// summed into 8 int32 partial sums, lane k holding products 4k..4k+3 and
// 32+4k..32+4k+3, converted to float; the caller multiplies in the weight's
// and the input's scales.
//
// q8: maddubs multiplies unsigned by signed bytes, so multiply |x| by w with
// x's sign moved onto w; pairs of products fit in int16 (2*127*127 < 32768).
//
// With AVX-512 (BW) the whole group fits one register, and with VNNI one
// vpdpbusd multiplies and sums each four products into int32. The two
// halves' lanes are then added, so the sums are the same integers as with
// AVX2 and so are the results, bit for bit (tested through an emulation of
// these instructions: tests/avx512_emulation.h).
#if defined(__AVX512BW__)
static inline __m256 group_sums(__m512i u, __m512i s) { // u unsigned, s signed bytes
#if defined(__AVX512VNNI__)
    __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
#else
    __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
#endif
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm512_castsi512_si256(p), _mm512_extracti64x4_epi64(p, 1)));
}

static inline __m256 q8_group(__m256i w0, __m256i w1, const int8_t *x) {
    __m512i xv = _mm512_loadu_si512(x), w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
    w = _mm512_mask_sub_epi8(w, _mm512_movepi8_mask(xv), _mm512_setzero_si512(), w); // -w where x < 0
    return group_sums(_mm512_abs_epi8(xv), w);
}
#else
static inline __m256 q8_group(__m256i w0, __m256i w1, const int8_t *x) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i x0 = _mm256_loadu_si256((const __m256i *)x), x1 = _mm256_loadu_si256((const __m256i *)(x + 32));
    __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x0), _mm256_sign_epi8(w0, x0)), ones);
    __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x1), _mm256_sign_epi8(w1, x1)), ones);
    return _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1));
}
#endif

// One row by one token (decoding): several accumulators, taking the groups in
// turn, keep the FMA latency out of the way of the weight stream: four groups
// (four cache lines) a step for q8, two (one line) for q4, each the faster in
// interleaved --bench runs (q8 with four: +3% median over 12 pairs; q4 with
// four: 7% slower). One row at a time on purpose: reading two rows together
// (two streams per core, sharing the loads of x) measured a third slower.
static float dot_q8(const int8_t *w, const float *ws, const QuantX *x, int n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = acc0, acc3 = acc0;
    int G = n / QGROUP;
    for (int g0 = 0; g0 < G; g0 += TILE_G) {
        int gn = G - g0 < TILE_G ? G - g0 : TILE_G, g = 0;
        float S[TILE_G];
        scale_products(S, ws + g0, x->scale + g0, NULL, gn, _mm256_setzero_ps());
        const int8_t *wb = w + g0 * QGROUP, *xb = x->q + g0 * QGROUP;
#define Q8G(k) q8_group(_mm256_loadu_si256((const __m256i *)(wg + 64 * (k))), _mm256_loadu_si256((const __m256i *)(wg + 64 * (k) + 32)), xb + (g + (k)) * QGROUP)
        for (; g + 4 <= gn; g += 4) {
            const int8_t *wg = wb + g * QGROUP;
            prefetch(wg);
            prefetch(wg + 64);
            prefetch(wg + 128);
            prefetch(wg + 192);
            acc0 = _mm256_fmadd_ps(Q8G(0), _mm256_broadcast_ss(&S[g]), acc0);
            acc1 = _mm256_fmadd_ps(Q8G(1), _mm256_broadcast_ss(&S[g + 1]), acc1);
            acc2 = _mm256_fmadd_ps(Q8G(2), _mm256_broadcast_ss(&S[g + 2]), acc2);
            acc3 = _mm256_fmadd_ps(Q8G(3), _mm256_broadcast_ss(&S[g + 3]), acc3);
        }
        for (; g < gn; g++) {
            const int8_t *wg = wb + g * QGROUP;
            acc0 = _mm256_fmadd_ps(Q8G(0), _mm256_broadcast_ss(&S[g]), acc0);
        }
#undef Q8G
    }
    return hsum_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

// q4: the stored u = q + 8 is unsigned already, so maddubs takes it as is
// (15*127*2 fits in int16 with room to add the two halves), and
// sum((u - 8) x) = sum(u x) - 8 sum(x): the second term, over all groups, is
// a short dot product of the row's scales with the groups' sums of x, which
// scale_products accumulates as it goes.
static inline __m256 q4_group(__m256i lo, __m256i hi, const int8_t *x) {
#if defined(__AVX512BW__)
    return group_sums(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_loadu_si512(x));
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                 _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
#endif
}

static inline void q4_unpack(const uint8_t *w, __m256i *lo, __m256i *hi) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i raw = _mm256_loadu_si256((const __m256i *)w);
    *lo = _mm256_and_si256(raw, low);                        // weights 0..31 of the group
    *hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);  // weights 32..63
}

static float dot_q4(const uint8_t *w, const float *ws, const QuantX *x, int n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), corr = _mm256_setzero_ps();
    __m256i lo, hi;
    int G = n / QGROUP;
    for (int g0 = 0; g0 < G; g0 += TILE_G) {
        int gn = G - g0 < TILE_G ? G - g0 : TILE_G, g = 0;
        float S[TILE_G];
        corr = scale_products(S, ws + g0, x->scale + g0, x->sum + g0, gn, corr);
        const uint8_t *wb = w + g0 * QGROUP / 2;
        const int8_t *xb = x->q + g0 * QGROUP;
        for (; g + 2 <= gn; g += 2) { // two groups: one cache line of weights
            prefetch(wb + g * QGROUP / 2);
            q4_unpack(wb + g * QGROUP / 2, &lo, &hi);
            acc0 = _mm256_fmadd_ps(q4_group(lo, hi, xb + g * QGROUP), _mm256_broadcast_ss(&S[g]), acc0);
            q4_unpack(wb + (g + 1) * QGROUP / 2, &lo, &hi);
            acc1 = _mm256_fmadd_ps(q4_group(lo, hi, xb + (g + 1) * QGROUP), _mm256_broadcast_ss(&S[g + 1]), acc1);
        }
        if (g < gn) {
            q4_unpack(wb + g * QGROUP / 2, &lo, &hi);
            acc0 = _mm256_fmadd_ps(q4_group(lo, hi, xb + g * QGROUP), _mm256_broadcast_ss(&S[g]), acc0);
        }
    }
    return hsum_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.0f), corr, _mm256_add_ps(acc0, acc1)));
}

// A tile: rows r < nr (at w + r * row_bytes, each followed by its scales)
// against tokens t < nt of x; out[t * ldo + r] = row r . token t, for q8 or q4
// weights (`type`). type, nr and nt are constants where this is inlined (nr,
// nt at most TILE_R, TILE_T), so the accumulators live in registers. The
// weights of a group are loaded once for all tokens, each token's inputs once
// for all rows, and the products of the scales come from a small table made
// ahead (loads, not multiplies, in the inner loop). `fetch`: the first tile of
// these rows prefetches their weights.
static inline __attribute__((always_inline)) void quant_tile(int type, const uint8_t *w, size_t row_bytes, int nr,
                                                             const QuantX *x, int nt, int K, float *out, size_t ldo,
                                                             int fetch) {
    int G = K / QGROUP, q4 = type == WEIGHT_Q4;
    size_t group_bytes = q4 ? QGROUP / 2 : QGROUP, scales_at = (size_t)G * group_bytes;
    __m256 acc[TILE_R][TILE_T], corr[TILE_R][TILE_T]; // corr: q4's offset correction
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) acc[r][t] = corr[r][t] = _mm256_setzero_ps();
    for (int g0 = 0; g0 < G; g0 += TILE_G) {
        int gn = G - g0 < TILE_G ? G - g0 : TILE_G;
        float S[TILE_R][TILE_T][TILE_G]; // the scales' products, per (row, token, group)
        for (int r = 0; r < nr; r++)
            for (int t = 0; t < nt; t++)
                corr[r][t] = scale_products(S[r][t], (const float *)(w + r * row_bytes + scales_at) + g0,
                                            x->scale + (size_t)t * G + g0, q4 ? x->sum + (size_t)t * G + g0 : NULL, gn,
                                            corr[r][t]);
        for (int g = 0; g < gn; g++) {
            __m256i a[TILE_R], b[TILE_R]; // the group's weights: q8 as two halves, q4 unpacked (low, high)
            for (int r = 0; r < nr; r++) {
                const uint8_t *row = w + r * row_bytes + (g0 + g) * group_bytes;
                if (fetch && (!q4 || g % 2 == 0)) prefetch(row);
                if (q4) q4_unpack(row, &a[r], &b[r]);
                else {
                    a[r] = _mm256_loadu_si256((const __m256i *)row);
                    b[r] = _mm256_loadu_si256((const __m256i *)(row + 32));
                }
            }
            for (int t = 0; t < nt; t++) {
                const int8_t *xq = x->q + (size_t)t * K + (g0 + g) * QGROUP;
                for (int r = 0; r < nr; r++) {
                    __m256 f = q4 ? q4_group(a[r], b[r], xq) : q8_group(a[r], b[r], xq);
                    acc[r][t] = _mm256_fmadd_ps(f, _mm256_broadcast_ss(&S[r][t][g]), acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++)
            out[t * ldo + r] = hsum_ps(q4 ? _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), corr[r][t], acc[r][t]) : acc[r][t]);
}

// e^x, 8 at a time, within 1 unit in the last place (measured over -87..88):
// x = n ln2 + r with |r| <= ln2/2, e^x = 2^n e^r, e^r by a polynomial
// (Cephes' expf, whose constants these are), 2^n put straight into the
// exponent bits.
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f)); // 2^n stays a normal float
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); // ln2 in two parts, so r is exact
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// h[i] = silu(h[i]) * h2[i], the gate of the experts' hidden layer.
static void swiglu(float *h, const float *h2, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(h + i);
        __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(silu, _mm256_loadu_ps(h2 + i)));
    }
    for (; i < n; i++) h[i] = silu_mul(h[i], h2[i]);
}

#elif defined(__ARM_NEON)
#define SIMD_NAME "neon"

static float dot_f32(const float *w, const float *x, int n) {
    float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0), a2 = vdupq_n_f32(0), a3 = vdupq_n_f32(0);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(w + i), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, vld1q_f32(w + i + 4), vld1q_f32(x + i + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(w + i + 8), vld1q_f32(x + i + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(w + i + 12), vld1q_f32(x + i + 12));
    }
    for (; i + 4 <= n; i += 4) a0 = vfmaq_f32(a0, vld1q_f32(w + i), vld1q_f32(x + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

static float dot_bf16(const uint16_t *w, const float *x, int n) {
    float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t h = vld1q_u16(w + i);
        a0 = vfmaq_f32(a0, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h), 16)), vld1q_f32(x + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; i++) s += bf16_to_f32(w[i]) * x[i];
    return s;
}

// 16 int8 products summed into 4 int32 lanes.
static inline int32x4_t dot16_s8(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    p = vmlal_s8(p, vget_high_s8(a), vget_high_s8(b)); // |sum of 2| <= 2*127*127: fits
    return vpadalq_s16(acc, p);
#endif
}

static float dot_q8(const int8_t *w, const float *ws, const QuantX *x, int n) {
    float32x4_t acc = vdupq_n_f32(0);
    for (int g = 0; g < n / QGROUP; g++) {
        int32x4_t isum = vdupq_n_s32(0);
        for (int i = g * QGROUP; i < (g + 1) * QGROUP; i += 16) isum = dot16_s8(isum, vld1q_s8(w + i), vld1q_s8(x->q + i));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), ws[g] * x->scale[g]);
    }
    return vaddvq_f32(acc);
}

static float dot_q4(const uint8_t *w, const float *ws, const QuantX *x, int n) {
    float32x4_t acc = vdupq_n_f32(0);
    const uint8x16_t low = vdupq_n_u8(0x0F);
    const int8x16_t eight = vdupq_n_s8(8);
    for (int g = 0; g < n / QGROUP; g++) {
        int32x4_t isum = vdupq_n_s32(0);
        int i = g * QGROUP;
        for (int h = 0; h < 2; h++) { // bytes i/2 + 16h .. +15: weights i+16h.. (low) and i+32+16h.. (high)
            uint8x16_t raw = vld1q_u8(w + i / 2 + 16 * h);
            int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, low)), eight);
            int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), eight);
            isum = dot16_s8(isum, lo, vld1q_s8(x->q + i + 16 * h));
            isum = dot16_s8(isum, hi, vld1q_s8(x->q + i + 32 + 16 * h));
        }
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), ws[g] * x->scale[g]);
    }
    return vaddvq_f32(acc);
}

#else
#define SIMD_NAME "portable C"

// Portable versions: four partial sums break the dependency chain.
static float dot_f32(const float *w, const float *x, int n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += w[i] * x[i]; s1 += w[i + 1] * x[i + 1];
        s2 += w[i + 2] * x[i + 2]; s3 += w[i + 3] * x[i + 3];
    }
    for (; i < n; i++) s0 += w[i] * x[i];
    return (s0 + s1) + (s2 + s3);
}

static float dot_bf16(const uint16_t *w, const float *x, int n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += bf16_to_f32(w[i]) * x[i]; s1 += bf16_to_f32(w[i + 1]) * x[i + 1];
        s2 += bf16_to_f32(w[i + 2]) * x[i + 2]; s3 += bf16_to_f32(w[i + 3]) * x[i + 3];
    }
    for (; i < n; i++) s0 += bf16_to_f32(w[i]) * x[i];
    return (s0 + s1) + (s2 + s3);
}

static float dot_q8(const int8_t *w, const float *ws, const QuantX *x, int n) {
    float s = 0.0f;
    for (int g = 0; g < n / QGROUP; g++) {
        int32_t isum = 0;
        for (int i = g * QGROUP; i < (g + 1) * QGROUP; i++) isum += (int32_t)w[i] * x->q[i];
        s += (float)isum * (ws[g] * x->scale[g]);
    }
    return s;
}

static float dot_q4(const uint8_t *w, const float *ws, const QuantX *x, int n) {
    float s = 0.0f;
    for (int g = 0; g < n / QGROUP; g++) {
        int32_t isum = 0;
        int i = g * QGROUP;
        for (int j = 0; j < 32; j++) {
            uint8_t b = w[i / 2 + j];
            isum += ((b & 15) - 8) * x->q[i + j] + ((b >> 4) - 8) * x->q[i + 32 + j];
        }
        s += (float)isum * (ws[g] * x->scale[g]);
    }
    return s;
}
#endif

#ifndef SIMD_SWIGLU
// h[i] = silu(h[i]) * h2[i], the gate of the experts' hidden layer.
static void swiglu(float *h, const float *h2, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] = silu_mul(h[i], h2[i]);
}
#endif

#ifndef SIMD_TILES
// Without tile kernels a tile is its dot products, token by token.
static void quant_tile(int type, const uint8_t *w, size_t row_bytes, int nr, const QuantX *x, int nt, int K, float *out,
                       size_t ldo, int fetch) {
    (void)fetch; // the hardware prefetcher on its own
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) {
            QuantX xt = quant_token(x, t, K);
            const uint8_t *row = w + r * row_bytes;
            out[t * ldo + r] = type == WEIGHT_Q8 ? dot_q8((const int8_t *)row, (const float *)(row + K), &xt, K)
                                                 : dot_q4(row, (const float *)(row + K / 2), &xt, K);
        }
}
#endif

// One row of W as f32: the embedding lookup.
static void matrix_row(float *out, const Matrix *W, int row) {
    const uint8_t *r = (const uint8_t *)W->data + (size_t)row * W->row_bytes;
    int n = W->cols;
    const float *scale = (const float *)(r + (W->type == WEIGHT_Q8 ? n : n / 2)); // q8/q4 only
    for (int j = 0; j < n; j++) {
        switch (W->type) {
        case WEIGHT_F32: out[j] = ((const float *)r)[j]; break;
        case WEIGHT_BF16: out[j] = bf16_to_f32(((const uint16_t *)r)[j]); break;
        case WEIGHT_Q8: out[j] = ((const int8_t *)r)[j] * scale[j / QGROUP]; break;
        case WEIGHT_Q4: { // byte i of a 64-weight block: weight i low, weight i+32 high
            uint8_t v = r[(j - j % 64) / 2 + j % 32];
            out[j] = ((j % 64 < 32 ? v & 15 : v >> 4) - 8) * scale[j / QGROUP];
        }
        }
    }
}

// One product of a batch: out (n, rows) = x (n, cols) @ W (rows, cols)^T, for
// n tokens at once. Each weight row is fetched from memory once and used for
// all n tokens while it sits in the cache: when decoding n is 1; for a chunk
// of prompt it is the chunk's tokens (or an expert's share of them).
typedef struct {
    float *out;        // (n, rows)
    const float *x;    // (n, cols)
    const Matrix *W;
    int n;
    const QuantX *xq;  // x quantized, for q8/q4 weights
} MatVec;

// Calls TILE(nr, nt) with the tile's shape as constants, so that each shape
// is compiled with its accumulators in registers.
#define TILE_SHAPES(nr, nt, TILE)                                                           \
    switch ((nr) * 10 + (nt)) {                                                             \
    case 11: TILE(1, 1); break; case 12: TILE(1, 2); break; case 13: TILE(1, 3); break;     \
    case 14: TILE(1, 4); break; case 21: TILE(2, 1); break; case 22: TILE(2, 2); break;     \
    case 23: TILE(2, 3); break; case 24: TILE(2, 4); break;                                 \
    }

// Rows [r0, r1) of one product: the one place weight formats are dispatched.
static void matvec_rows(const MatVec *m, int r0, int r1) {
    const Matrix *W = m->W;
    int n = W->cols, rows = W->rows;
    if (m->n > 1 && (W->type == WEIGHT_Q8 || W->type == WEIGHT_Q4)) {
        for (int r = r0; r < r1; r += TILE_R) {
            const uint8_t *w = (const uint8_t *)W->data + (size_t)r * W->row_bytes;
            int nr = r1 - r < TILE_R ? r1 - r : TILE_R;
            for (int t = 0; t < m->n; t += TILE_T) {
                int nt = m->n - t < TILE_T ? m->n - t : TILE_T;
                QuantX x = quant_token(m->xq, t, n);
                float *out = m->out + (size_t)t * rows + r;
#define Q8_TILE(R, T) quant_tile(WEIGHT_Q8, w, W->row_bytes, R, &x, T, n, out, rows, t == 0)
#define Q4_TILE(R, T) quant_tile(WEIGHT_Q4, w, W->row_bytes, R, &x, T, n, out, rows, t == 0)
                if (W->type == WEIGHT_Q8) TILE_SHAPES(nr, nt, Q8_TILE)
                else TILE_SHAPES(nr, nt, Q4_TILE)
            }
        }
        return;
    }
    // one token (decoding), or float weights: a dot product per (row, token)
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)W->data + (size_t)r * W->row_bytes;
        for (int i = 0; i < m->n; i++) {
            const float *x = m->x + (size_t)i * n;
            float *out = m->out + (size_t)i * rows + r;
            QuantX xi = m->xq ? quant_token(m->xq, i, n) : (QuantX){NULL, NULL, NULL, NULL, 0};
            switch (W->type) {
            case WEIGHT_F32: *out = dot_f32((const float *)row, x, n); break;
            case WEIGHT_BF16: *out = dot_bf16((const uint16_t *)row, x, n); break;
            case WEIGHT_Q8: *out = dot_q8((const int8_t *)row, (const float *)(row + n), &xi, n); break;
            case WEIGHT_Q4: *out = dot_q4(row, (const float *)(row + n / 2), &xi, n); break;
            }
        }
    }
}

typedef struct {
    const MatVec *mv;
    int n;
    int64_t total_work;
    int pieces;         // batches: the work is cut into this many equal pieces
    atomic_int next;    // the next piece nobody has taken
    ThreadPool *pool;   // decoding: blocks shared out by the pool instead
} MatmulJob;

// Units [lo, hi) of a batch's work: its rows, stacked, a row of an n-token
// product counting n units; each product gets the rows whose first unit falls
// in [lo, hi).
static void matmul_range(const MatmulJob *j, int64_t lo, int64_t hi) {
    int64_t base = 0;
    for (int i = 0; i < j->n; i++) {
        const MatVec *m = &j->mv[i];
        int64_t rows = m->W->rows, n = m->n;
        int64_t r0 = lo <= base ? 0 : (lo - base + n - 1) / n, r1 = hi <= base ? 0 : (hi - base + n - 1) / n;
        if (r0 > rows) r0 = rows;
        if (r1 > rows) r1 = rows;
        if (r0 < r1) matvec_rows(m, (int)r0, (int)r1);
        base += rows * n;
    }
}

// Decoding (one token) is bound by memory: blocks of DECODE_BLOCK rows are
// shared out with stealing (pool_share), so that each worker streams through
// one contiguous range of the weights, which memory serves best. Batches are
// bound by arithmetic instead, and their work is cut into more pieces than
// workers, each taking the next free piece. Which worker computes a row never
// changes the row's result.
#define DECODE_BLOCK 16
static void matmul_job(void *arg, int tid, int nthreads) {
    (void)nthreads;
    MatmulJob *j = arg;
    if (j->pool) {
        for (int64_t b; (b = pool_next_block(j->pool, tid)) >= 0;)
            matmul_range(j, b * DECODE_BLOCK, (b + 1) * DECODE_BLOCK < j->total_work ? (b + 1) * DECODE_BLOCK : j->total_work);
        return;
    }
    for (int c; (c = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed)) < j->pieces;)
        matmul_range(j, j->total_work * c / j->pieces, j->total_work * (c + 1) / j->pieces);
}

// ----------------------------------------------------------------------------
// 5. state and KV cache
//
// Each layer keeps the keys and values of past positions in S slots. Without
// a sliding window S is the context length and position p lives in slot p.
// With a window W (and W <= context), S = W and position p lives in slot p % W:
// a ring buffer. The query at p needs keys p-W+1..p, exactly the W slots, so
// the slot being overwritten (p-W) is the one that just fell out of the window,
// and memory stays bounded however long generation runs. The slots of each kv
// head lie one after another, so that attention reads a head's keys (and
// values) as one sequential stream.

typedef struct {
    int chunk;         // C: most tokens run through the model together (1 when decoding)
    float *x;          // (C, D) the residual stream
    float *xb;         // (C, D) normed input of a block
    float *xb2;        // (C, D) attention output after wo
    float *q;          // (C, Q)
    float *k, *v;      // (C, KV) the chunk's keys and values, before they join the cache
    float *att_out;    // (C, Q) attention output, before wo
    float *att;        // (n_heads, S) attention scores of one query
    // the mixture of experts works on (token, expert) pairs grouped by expert: row j
    // of these buffers is pair j; an expert's pairs are consecutive rows
    float *moe_in;     // (C*K, D) the pair's token's normed input
    float *hb, *hb2;   // (C*K, H) the expert's hidden activations
    float *moe_out;    // (C*K, D) the expert's output
    int *pair_token;   // (C*K,) which token of the chunk
    float *pair_weight; // (C*K,) its routing weight
    float *router;     // (E,) router logits, then probabilities
    float *rope_inv_freq; // (head_dim/2,)
    float *logits;     // (C, V)
    float *key_cache;   // (n_layers, n_kv_heads, S, head_dim)
    float *value_cache; // (n_layers, n_kv_heads, S, head_dim)
    int n_slots;        // S
    int max_pos;        // positions 0..max_pos-1 may be computed
    int *chosen;        // (C, n_layers, top_k) experts picked for each token of the last chunk
    float *chosen_w;    // (C, n_layers, top_k) their weights
    QuantX *xq;         // (n_experts,) quantized inputs of a matmul batch, C rows each
    int group;          // quantization group size (0: float weights)
    ThreadPool *pool;
    uint64_t bytes_read; // weight and cache bytes read so far (for --bench)
    // routing statistics (--expert-stats), over every token run through the model
    uint64_t *expert_count;  // (n_layers, E) times each expert was chosen
    double *router_entropy;  // (n_layers,) sum over tokens of the router softmax's entropy, bits
    uint64_t tokens_routed;
} State;

static void state_init(State *s, const Config *p, int context, int chunk, ThreadPool *pool) {
    size_t D = p->dim, H = p->hidden_dim, K = p->top_k, E = p->n_experts, C = chunk;
    size_t Q = (size_t)p->n_heads * p->head_dim, KV = (size_t)p->n_kv_heads * p->head_dim;
    memset(s, 0, sizeof(*s));
    if (p->sliding_window > 0 && p->sliding_window <= context) {
        s->n_slots = p->sliding_window; // ring buffer: positions unbounded
        s->max_pos = INT_MAX;
    } else {
        s->n_slots = context;
        s->max_pos = context;
    }
    s->chunk = chunk;
    s->x = xcalloc(C * D, sizeof(float));
    s->xb = xcalloc(C * D, sizeof(float));
    s->xb2 = xcalloc(C * D, sizeof(float));
    s->q = xcalloc(C * Q, sizeof(float));
    s->k = xcalloc(C * KV, sizeof(float));
    s->v = xcalloc(C * KV, sizeof(float));
    s->att_out = xcalloc(C * Q, sizeof(float));
    s->att = xcalloc((size_t)p->n_heads * s->n_slots, sizeof(float));
    s->moe_in = xcalloc(C * K * D, sizeof(float));
    s->hb = xcalloc(C * K * H, sizeof(float));
    s->hb2 = xcalloc(C * K * H, sizeof(float));
    s->moe_out = xcalloc(C * K * D, sizeof(float));
    s->pair_token = xcalloc(C * K, sizeof(int));
    s->pair_weight = xcalloc(C * K, sizeof(float));
    s->router = xcalloc(E, sizeof(float));
    s->logits = xcalloc(C * p->vocab_size, sizeof(float));
    s->key_cache = xcalloc((size_t)p->n_layers * s->n_slots * KV, sizeof(float));
    s->value_cache = xcalloc((size_t)p->n_layers * s->n_slots * KV, sizeof(float));
    s->chosen = xcalloc(C * p->n_layers * K, sizeof(int));
    s->chosen_w = xcalloc(C * p->n_layers * K, sizeof(float));
    s->expert_count = xcalloc((size_t)p->n_layers * E, sizeof(uint64_t));
    s->router_entropy = xcalloc(p->n_layers, sizeof(double));
    s->group = p->group_size;
    s->xq = xcalloc(E, sizeof(QuantX));
    if (s->group) {
        size_t widest = D > H ? D : H;
        widest = widest > Q ? widest : Q;
        for (size_t e = 0; e < E; e++) {
            s->xq[e].q = xcalloc(C * widest, 1);
            s->xq[e].scale = xcalloc(C * widest / QGROUP, sizeof(float));
            s->xq[e].sum = xcalloc(C * widest / QGROUP, sizeof(float));
        }
    }
    // modeling_mixtral.py: MixtralRotaryEmbedding, inv_freq = 1 / theta^(2i/head_dim), in fp32
    s->rope_inv_freq = xcalloc(p->head_dim / 2, sizeof(float));
    for (int i = 0; i < p->head_dim / 2; i++)
        s->rope_inv_freq[i] = 1.0f / powf(p->rope_theta, (float)(2 * i) / (float)p->head_dim);
    s->pool = pool;
}

static void state_free(State *s, const Config *p) {
    float *bufs[] = {s->x, s->xb, s->xb2, s->q, s->k, s->v, s->att_out, s->att, s->moe_in, s->hb, s->hb2,
                     s->moe_out, s->pair_weight, s->router, s->logits, s->key_cache, s->value_cache,
                     s->chosen_w, s->rope_inv_freq};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) free(bufs[i]);
    for (int e = 0; s->group && e < p->n_experts; e++) { free(s->xq[e].q); free(s->xq[e].scale); free(s->xq[e].sum); }
    free(s->xq);
    free(s->chosen);
    free(s->pair_token);
    free(s->expert_count);
    free(s->router_entropy);
}

// Quantizes the inputs qx[0..n) (qx[i].x, qx[i].groups), cut into equal
// shares of groups.
typedef struct { QuantX *qx; int n; int64_t total; } QuantizeJob;

static void quantize_job(void *arg, int tid, int nthreads) {
    const QuantizeJob *j = arg;
    int64_t lo = j->total * tid / nthreads, hi = j->total * (tid + 1) / nthreads, base = 0;
    for (int i = 0; i < j->n; base += j->qx[i++].groups) {
        int64_t g0 = lo > base ? lo - base : 0, g1 = hi - base < j->qx[i].groups ? hi - base : j->qx[i].groups;
        if (g0 < g1) quantize_groups(&j->qx[i], j->qx[i].x, g0, g1);
    }
}

// A batch of products in one round of the pool: mv[i].out = mv[i].x @ mv[i].W^T.
// Inputs of quantized matrices are quantized first (on the pool too), once
// per distinct input (products sharing an input come together in the batch).
static void matmul(State *s, MatVec *mv, int n) {
    int64_t work = 0;
    int tokens = 0;
    QuantizeJob qj = {s->xq, 0, 0};
    for (int i = 0; i < n; i++) {
        const Matrix *W = mv[i].W;
        work += (int64_t)W->rows * mv[i].n;
        if (mv[i].n > tokens) tokens = mv[i].n;
        s->bytes_read += (uint64_t)W->rows * W->row_bytes;
        if (W->type != WEIGHT_Q8 && W->type != WEIGHT_Q4) continue;
        if (qj.n == 0 || s->xq[qj.n - 1].x != mv[i].x) {
            QuantX *qx = &s->xq[qj.n++];
            qx->x = mv[i].x;
            qx->groups = (int64_t)mv[i].n * W->cols / QGROUP;
            qj.total += qx->groups;
        }
        mv[i].xq = &s->xq[qj.n - 1];
    }
    if (qj.total) pool_run(s->pool, quantize_job, &qj);
    MatmulJob job = {mv, n, work, 8 * s->pool->n, 0, NULL};
    if (tokens == 1) {
        job.pool = s->pool;
        pool_share(s->pool, (work + DECODE_BLOCK - 1) / DECODE_BLOCK);
    }
    pool_run(s->pool, matmul_job, &job);
}

// ----------------------------------------------------------------------------
// 6. forward pass

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
    const float *kc, *vc; // this layer's caches, (n_kv_heads, S, head_dim)
    int pos0, n;          // the chunk: positions pos0 .. pos0+n-1
} AttentionJob;

// Key or value of position t for kv head kvh: from the chunk's own (C, KV) if
// t is in the chunk, else from the cache, slot t % S.
static inline const float *kv_at(const AttentionJob *j, const float *cache, const float *chunk, int kvh, int t, int slot) {
    int hd = j->p->head_dim, S = j->s->n_slots;
    return t >= j->pos0 ? chunk + (size_t)(t - j->pos0) * j->p->n_kv_heads * hd + (size_t)kvh * hd
                        : cache + ((size_t)kvh * S + slot) * hd;
}

// Scaled dot-product attention for a share of the heads, for every query of
// the chunk. Query head h reads kv head h / (n_heads / n_kv_heads): grouped-
// query attention (repeat_kv); the heads of a group are neighbours, so a
// worker reads a kv head's cache once from memory and then from its own cache.
// Keys before the chunk come from the KV cache, the chunk's own from s->k, s->v.
static void attention_job(void *arg, int tid, int nthreads) {
    AttentionJob *j = arg;
    const Config *p = j->p;
    State *s = j->s;
    int hd = p->head_dim, Q = p->n_heads * hd, group = p->n_heads / p->n_kv_heads;
    float scale = 1.0f / sqrtf((float)hd);
    int h0, h1;
    split_range(p->n_heads, tid, nthreads, &h0, &h1);
    for (int h = h0; h < h1; h++) {
        int kvh = h / group;
        float *att = s->att + (size_t)h * s->n_slots;
        for (int i = 0; i < j->n; i++) {
            int pos = j->pos0 + i;
            // keys in view: the last W positions with a window, else all of 0..pos
            int first = p->sliding_window > 0 && pos - p->sliding_window + 1 > 0 ? pos - p->sliding_window + 1 : 0;
            const float *q = s->q + (size_t)i * Q + h * hd;
            for (int t = first, slot = first % s->n_slots; t <= pos; t++, slot = slot + 1 == s->n_slots ? 0 : slot + 1)
                att[t - first] = dot_f32(q, kv_at(j, j->kc, s->k, kvh, t, slot), hd) * scale;
            softmax(att, pos - first + 1);
            float *out = s->att_out + (size_t)i * Q + h * hd;
            memset(out, 0, hd * sizeof(float));
            for (int t = first, slot = first % s->n_slots; t <= pos; t++, slot = slot + 1 == s->n_slots ? 0 : slot + 1) {
                const float *v = kv_at(j, j->vc, s->v, kvh, t, slot), a = att[t - first];
                for (int d = 0; d < hd; d++) out[d] += a * v[d];
            }
        }
    }
}

// Self-attention of one layer for the chunk; adds its output to x.
// modeling_mixtral.py: MixtralAttention.forward
static void attention(const Config *p, const Layer *L, State *s, int l, int pos0, int n) {
    int D = p->dim, Q = p->n_heads * p->head_dim, hd = p->head_dim, KV = p->n_kv_heads * hd, S = s->n_slots;
    float *kc = s->key_cache + (size_t)l * S * KV;
    float *vc = s->value_cache + (size_t)l * S * KV;

    for (int i = 0; i < n; i++) rmsnorm(s->xb + (size_t)i * D, s->x + (size_t)i * D, L->attn_norm, D, p->rms_norm_eps);
    MatVec qkv[3] = {{s->q, s->xb, &L->wq, n, NULL}, {s->k, s->xb, &L->wk, n, NULL}, {s->v, s->xb, &L->wv, n, NULL}};
    matmul(s, qkv, 3); // q, k, v projections
    for (int i = 0; i < n; i++) {
        rope(s->q + (size_t)i * Q, p->n_heads, p->head_dim, pos0 + i, s->rope_inv_freq);
        rope(s->k + (size_t)i * KV, p->n_kv_heads, p->head_dim, pos0 + i, s->rope_inv_freq);
    }

    AttentionJob job = {p, s, kc, vc, pos0, n};
    pool_run(s->pool, attention_job, &job);
    // Only now do the chunk's keys and values join the cache: with a window, a
    // chunk longer than one step would otherwise overwrite keys its own earlier
    // queries still need. Position t goes to slot t % S (the ring).
    for (int i = 0; i < n; i++) {
        size_t slot = (size_t)((pos0 + i) % S);
        for (int h = 0; h < p->n_kv_heads; h++) {
            memcpy(kc + ((size_t)h * S + slot) * hd, s->k + (size_t)i * KV + h * hd, hd * sizeof(float));
            memcpy(vc + ((size_t)h * S + slot) * hd, s->v + (size_t)i * KV + h * hd, hd * sizeof(float));
        }
        int seen = pos0 + i + 1 < S ? pos0 + i + 1 : S;
        s->bytes_read += (uint64_t)2 * seen * KV * sizeof(float);
    }
    MatVec o = {s->xb2, s->att_out, &L->wo, n, NULL};
    matmul(s, &o, 1); // o_proj
    for (size_t i = 0; i < (size_t)n * D; i++) s->x[i] += s->xb2[i]; // residual
}

// The router for one token, in three steps: logits -> top-k -> weights.
// modeling_mixtral.py: MixtralSparseMoeBlock.forward
static void route(const Config *p, const Layer *L, State *s, int l, const float *xb, int *chosen, float *weight) {
    int D = p->dim, E = p->n_experts, K = p->top_k;
    // 1. router logits = gate @ xb, (E,D) @ (D,) -> (E,), always in f32
    for (int e = 0; e < E; e++) s->router[e] = dot_f32(L->gate + (size_t)e * D, xb, D);

    // 2. top-k of the softmax over all experts. Softmax is monotonic, so these
    //    are the k largest logits. Ties go to the lower expert index.
    softmax(s->router, E);
    for (int e = 0; e < E; e++)
        if (s->router[e] > 0) s->router_entropy[l] -= s->router[e] * log2(s->router[e]);
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < k; i++) taken |= chosen[i] == e;
            if (!taken && (best < 0 || s->router[e] > s->router[best])) best = e;
        }
        chosen[k] = best;
        weight[k] = s->router[best];
        s->expert_count[(size_t)l * E + best]++;
    }

    // 3. weights: divide the chosen probabilities by their sum. The softmax's
    //    normaliser cancels, so this equals a softmax over just the chosen logits.
    float sum = 0.0f;
    for (int k = 0; k < K; k++) sum += weight[k];
    for (int k = 0; k < K; k++) weight[k] /= sum;
}

// h = silu(h) * h2, elementwise (swiglu): the gate of the experts' hidden
// layer, in equal shares on the pool.
typedef struct { float *h; const float *h2; int64_t n; } SwiGLU;

static void swiglu_job(void *arg, int tid, int nthreads) {
    const SwiGLU *a = arg;
    int64_t i0 = a->n * tid / nthreads / 8 * 8, i1 = tid + 1 == nthreads ? a->n : a->n * (tid + 1) / nthreads / 8 * 8;
    swiglu(a->h + i0, a->h2 + i0, i1 - i0); // (shares are whole vectors: the same result on any number of threads)
}

// The mixture of experts of one layer for the chunk; adds its output to x.
// Step 4, the expert loop, runs each chosen expert once over all the tokens
// that chose it: out = sum_k weight_k * w2(silu(w1 xb) * w3 xb).
static void moe(const Config *p, const Layer *L, State *s, int l, int n) {
    int D = p->dim, H = p->hidden_dim, E = p->n_experts, K = p->top_k, NL = p->n_layers;
    s->bytes_read += (uint64_t)n * E * D * sizeof(float); // the router
    int count[E], start[E + 1], fill[E];
    memset(count, 0, sizeof(count));
    for (int i = 0; i < n; i++) {
        float *xb = s->xb + (size_t)i * D;
        int *chosen = s->chosen + ((size_t)i * NL + l) * K;
        rmsnorm(xb, s->x + (size_t)i * D, L->ffn_norm, D, p->rms_norm_eps);
        route(p, L, s, l, xb, chosen, s->chosen_w + ((size_t)i * NL + l) * K);
        for (int k = 0; k < K; k++) count[chosen[k]]++;
    }
    // Group the (token, expert) pairs by expert (a counting sort) and gather inputs.
    start[0] = 0;
    for (int e = 0; e < E; e++) { start[e + 1] = start[e] + count[e]; fill[e] = start[e]; }
    for (int i = 0; i < n; i++)
        for (int k = 0; k < K; k++) {
            size_t at = ((size_t)i * NL + l) * K + k;
            int j = fill[s->chosen[at]]++;
            s->pair_token[j] = i;
            s->pair_weight[j] = s->chosen_w[at];
            memcpy(s->moe_in + (size_t)j * D, s->xb + (size_t)i * D, D * sizeof(float));
        }
    // 4. every expert that was chosen runs once over its rows: all up projections
    //    (w1, w3) in one round of the pool, all down projections (w2) in the next.
    MatVec up[2 * E], down[E];
    int active = 0;
    for (int e = 0; e < E; e++) {
        if (count[e] == 0) continue;
        const Expert *ex = &L->experts[e];
        size_t j = start[e];
        up[2 * active] = (MatVec){s->hb + j * H, s->moe_in + j * D, &ex->w1, count[e], NULL};
        up[2 * active + 1] = (MatVec){s->hb2 + j * H, s->moe_in + j * D, &ex->w3, count[e], NULL};
        down[active++] = (MatVec){s->moe_out + j * D, s->hb + j * H, &ex->w2, count[e], NULL};
    }
    matmul(s, up, 2 * active);
    SwiGLU act = {s->hb, s->hb2, (int64_t)n * K * H};
    pool_run(s->pool, swiglu_job, &act);
    matmul(s, down, active);
    for (int j = 0; j < n * K; j++) { // weighted sum into the residual, expert by expert
        float *x = s->x + (size_t)s->pair_token[j] * D, w = s->pair_weight[j];
        const float *y = s->moe_out + (size_t)j * D;
        for (int i = 0; i < D; i++) x[i] += w * y[i];
    }
}

// Runs n tokens, at positions pos0 .. pos0+n-1, through the model. Returns the
// logits: (n, V) with all_logits, else (1, V) for the last token only.
// modeling_mixtral.py: MixtralForCausalLM.forward, for a chunk of new tokens.
static float *forward_chunk(Model *m, State *s, const int *ids, int n, int pos0, int all_logits) {
    const Config *p = &m->config;
    int D = p->dim;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= p->vocab_size)
            die("token id %d is outside the vocabulary 0..%d", ids[i], p->vocab_size - 1);
        matrix_row(s->x + (size_t)i * D, &m->weights.embed, ids[i]); // embed_tokens
    }
    if (pos0 < 0 || pos0 > s->max_pos - n)
        die("position %d is past the context of %d tokens; use a larger -c", pos0 + n - 1, s->max_pos);
    for (int l = 0; l < p->n_layers; l++) {
        attention(p, &m->weights.layers[l], s, l, pos0, n);
        moe(p, &m->weights.layers[l], s, l, n);
    }
    s->tokens_routed += n;
    int first = all_logits ? 0 : n - 1;
    for (int i = first; i < n; i++) rmsnorm(s->x + (size_t)i * D, s->x + (size_t)i * D, m->weights.norm, D, p->rms_norm_eps);
    MatVec head = {s->logits, s->x + (size_t)first * D, &m->weights.lm_head, n - first, NULL};
    matmul(s, &head, 1);
    return s->logits;
}

// One token at position pos: decoding is a chunk of one.
static float *forward(Model *m, State *s, int token, int pos) {
    return forward_chunk(m, s, &token, 1, pos, 0);
}

// ----------------------------------------------------------------------------
// 7. sampler

typedef struct { float prob; int id; } ProbId;

typedef struct {
    float temperature;  // 0: greedy
    float topp;         // nucleus sampling threshold; 1 or more: off
    uint64_t rng;       // xorshift64* state
    ProbId *order;      // (V,) scratch for top-p
} Sampler;

static uint32_t random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1DULL) >> 32);
}

static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; } // [0,1)

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static int compare_prob_desc(const void *a, const void *b) {
    const ProbId *x = a, *y = b;
    return x->prob > y->prob ? -1 : x->prob < y->prob ? 1 : x->id - y->id;
}

// Picks the next token from logits (V,), which it overwrites with probabilities.
static int sample(Sampler *sm, float *logits, int n) {
    if (sm->temperature == 0.0f) return argmax(logits, n);
    for (int i = 0; i < n; i++) logits[i] /= sm->temperature;
    softmax(logits, n);
    float r = random_f32(&sm->rng);
    if (sm->topp <= 0.0f || sm->topp >= 1.0f) {
        float cdf = 0.0f;
        for (int i = 0; i < n; i++) { cdf += logits[i]; if (r < cdf) return i; }
        return n - 1;
    }
    // top-p: the smallest set of most likely tokens whose mass exceeds topp.
    // Tokens below (1-topp)/(n-1) can never be in it, which keeps the sort short.
    int m = 0;
    float cutoff = (1.0f - sm->topp) / (n - 1);
    for (int i = 0; i < n; i++) if (logits[i] >= cutoff) sm->order[m++] = (ProbId){logits[i], i};
    qsort(sm->order, m, sizeof(ProbId), compare_prob_desc);
    float mass = 0.0f;
    int last = m - 1;
    for (int i = 0; i < m; i++) { mass += sm->order[i].prob; if (mass > sm->topp) { last = i; break; } }
    float cdf = 0.0f;
    r *= mass;
    for (int i = 0; i <= last; i++) { cdf += sm->order[i].prob; if (r < cdf) return sm->order[i].id; }
    return sm->order[last].id;
}

// ----------------------------------------------------------------------------
// 8. generation and chat

// A growable list of token ids.
typedef struct { int *ids; int n, cap; } IdList;

static void ids_push(IdList *l, int id) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        if (!(l->ids = realloc(l->ids, l->cap * sizeof(int)))) die("out of memory");
    }
    l->ids[l->n++] = id;
}

static void ids_push_text(IdList *l, const Tokenizer *t, const char *text, size_t len) {
    int *ids;
    int n = tokenizer_encode(t, text, len, &ids);
    if (n < 0) die("out of memory encoding the prompt");
    for (int i = 0; i < n; i++) ids_push(l, ids[i]);
    free(ids);
}

// Writes decoded text to stdout as soon as it is complete UTF-8.
static void emit(TokenDecoder *d, const Tokenizer *t, int id, char *buf) {
    int n = decoder_put(d, t, id, buf);
    if (n > 0) { fwrite(buf, 1, n, stdout); fflush(stdout); }
}

// Runs ids through the model from position *pos on; the logits of the last
// one are left in s->logits.
static void feed(Model *m, State *s, const int *ids, int n, int *pos) {
    for (int i = 0; i < n; i += s->chunk) { // the prompt goes through in chunks
        int c = n - i < s->chunk ? n - i : s->chunk;
        forward_chunk(m, s, ids + i, c, *pos, 0);
        *pos += c;
    }
}

typedef struct { int tokens; int context_full; double seconds; } Reply;

// --trace-experts: the routing of each generated token, printed after generation.
typedef struct {
    int n, cap;
    int *token;       // (n,)
    int *chosen;      // (n, n_layers, top_k)
    float *weight;    // (n, n_layers, top_k)
} Trace;

static void trace_add(Trace *tr, const State *s, const Config *p, int token) {
    size_t per = (size_t)p->n_layers * p->top_k;
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

// Samples up to `steps` tokens after what has been fed, streaming their text,
// until EOS or a full context. The sampled EOS is not fed: the caller does that
// when the conversation goes on.
static Reply reply(Model *m, State *s, Sampler *sm, int steps, int *pos, Trace *trace) {
    const Config *p = &m->config;
    Reply r = {0, 0, 0};
    char *buf = xcalloc(decoder_max_bytes(&m->tokenizer), 1);
    TokenDecoder dec;
    decoder_init(&dec);
    double t0 = time_s();
    while (r.tokens < steps) {
        int token = sample(sm, s->logits, p->vocab_size);
        r.tokens++;
        if (token == p->eos_id) break;
        emit(&dec, &m->tokenizer, token, buf);
        if (*pos >= s->max_pos) { r.context_full = 1; break; }
        forward(m, s, token, (*pos)++);
        if (trace) trace_add(trace, s, p, token); // the experts that processed this token
    }
    fwrite(buf, 1, decoder_flush(&dec, buf), stdout);
    fflush(stdout);
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
// the model processed (prompt and generated), with a heatmap and two entropies:
// of the usage counts (load balance; log2(E) bits when perfectly even) and of
// the router's softmax, averaged over tokens (how decided the router is).
static void print_expert_stats(const Config *p, const State *s) {
    int E = p->n_experts, K = p->top_k;
    const char *shades = " .:-=+*#%@"; // share of choices relative to an even share 1/E: 0 .. 2x and over
    uint64_t n = s->tokens_routed;
    printf("\nexpert usage over %llu tokens (top-%d of %d experts; heat: ' ' none, '=' an even share, '%%' twice that)\n",
           (unsigned long long)n, K, E);
    printf("layer |");
    for (int e = 0; e < E; e++) printf(" %5d", e);
    printf(" | heat%*s | usage H | router H\n", E > 4 ? E - 4 : 0, "");
    for (int l = 0; l < p->n_layers; l++) {
        const uint64_t *c = s->expert_count + (size_t)l * E;
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
        printf("%*s | %7.2f | %8.2f\n", E < 4 ? 4 - E : 0, "", h, n ? s->router_entropy[l] / n : 0.0);
    }
    printf("(entropies in bits; even usage over %d experts is %.2f)\n", E, log2(E));
}

// --trace-experts: for each generated token, the experts that processed it in
// every layer, as "a+b .62": the chosen experts, best first, and the weight of the best.
static void print_trace(const Model *m, const Trace *tr) {
    const Config *p = &m->config;
    int K = p->top_k, L = p->n_layers;
    int digits = p->n_experts > 100 ? 3 : p->n_experts > 10 ? 2 : 1;
    int col = K * digits + (K - 1) + 4;
    char label[64];
    printf("\nexperts per generated token and layer (chosen experts, best first, and the best one's weight)\n");
    printf("%-14s", "token");
    for (int l = 0; l < L; l++) printf(" %-*s", col, l == 0 ? "L0" : "");
    printf("\n");
    for (int i = 0; i < tr->n; i++) {
        token_label(&m->tokenizer, tr->token[i], label, 14);
        printf("%s%*s", label, 14 - utf8_width(label), "");
        for (int l = 0; l < L; l++) {
            const int *c = tr->chosen + ((size_t)i * L + l) * K;
            const float *w = tr->weight + ((size_t)i * L + l) * K;
            char cell[64];
            int o = 0;
            for (int k = 0; k < K && o < 48; k++) o += snprintf(cell + o, sizeof(cell) - o, k ? "+%d" : "%d", c[k]);
            snprintf(cell + o, sizeof(cell) - o, " .%02d", (int)(w[0] * 100 + 0.5) > 99 ? 99 : (int)(w[0] * 100 + 0.5));
            printf(" %-*s", col, cell);
        }
        printf("\n");
    }
}

static void generate(Model *m, State *s, Sampler *sm, const char *prompt, int steps, int stats, int trace) {
    const Config *p = &m->config;
    IdList prompt_ids = {0};
    ids_push(&prompt_ids, p->bos_id);
    ids_push_text(&prompt_ids, &m->tokenizer, prompt, strlen(prompt));
    int n = prompt_ids.n;
    if (n > s->max_pos) die("the prompt is %d tokens but the context holds %d; use a larger -c", n, s->max_pos);

    // echo the prompt, then continue it
    char *buf = xcalloc(decoder_max_bytes(&m->tokenizer), 1);
    TokenDecoder dec;
    decoder_init(&dec);
    for (int i = 1; i < n; i++) emit(&dec, &m->tokenizer, prompt_ids.ids[i], buf);
    fwrite(buf, 1, decoder_flush(&dec, buf), stdout);
    free(buf);

    double t0 = time_s();
    int pos = 0;
    feed(m, s, prompt_ids.ids, n, &pos);
    double t_prompt = time_s() - t0;
    Trace tr = {0};
    Reply r = reply(m, s, sm, steps, &pos, trace ? &tr : NULL);
    printf("\n");
    if (trace) print_trace(m, &tr);
    if (stats) print_expert_stats(p, s);
    free(tr.token);
    free(tr.chosen);
    free(tr.weight);
    fflush(stdout);
    if (r.context_full)
        fprintf(stderr, "mixtral: stopped: the context of %d tokens is full (use a larger -c)\n", s->max_pos);
    fprintf(stderr, "prompt: %d tokens, %.2f tok/s; generated: %d tokens, %.2f tok/s\n", n,
            n / (t_prompt > 0 ? t_prompt : 1e-9), r.tokens, r.tokens / (r.seconds > 0 ? r.seconds : 1e-9));
    free(prompt_ids.ids);
}

// --- chat: Mistral's instruct format, as mistral-common writes it -----------
//
//   v1 (Mixtral-8x7B-Instruct): <s> encode("[INST] {user} [/INST]") encode("{assistant}") </s> ...
//   v3 (Mixtral-8x22B-Instruct): <s> [INST] encode("{user}") [/INST] encode("{assistant}") </s> ...
// where [INST] and [/INST] are control tokens in v3 and plain text in v1. A
// system prompt goes before the first user message, followed by a blank line.

enum { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT };

typedef struct { int role; char *content; size_t len; } Message;

// Appends one user turn: [INST] {system\n\n}{text} [/INST]
static void format_user(IdList *out, const Tokenizer *t, const char *system, const char *text, size_t len) {
    size_t slen = system && *system ? strlen(system) : 0;
    char *content = xcalloc(slen + len + 32, 1);
    size_t n = 0;
    if (slen) { memcpy(content, system, slen); memcpy(content + slen, "\n\n", 2); n = slen + 2; }
    memcpy(content + n, text, len);
    n += len;
    int inst = tokenizer_lookup(t, "[INST]", 6), end_inst = tokenizer_lookup(t, "[/INST]", 7);
    if (inst >= 0 && end_inst >= 0 && t->type[inst] == PIECE_CONTROL && t->type[end_inst] == PIECE_CONTROL) {
        ids_push(out, inst); // v3: control tokens around the text
        ids_push_text(out, t, content, n);
        ids_push(out, end_inst);
    } else { // v1: the markers are text
        char *s = xcalloc(n + 32, 1);
        memcpy(s, "[INST] ", 7);
        memcpy(s + 7, content, n);
        memcpy(s + 7 + n, " [/INST]", 8);
        ids_push_text(out, t, s, n + 15);
        free(s);
    }
    free(content);
}

// The ids of a whole conversation, BOS first; system messages are joined.
static void format_conversation(IdList *out, const Model *m, const Message *msgs, int n, const char *path) {
    const Tokenizer *t = &m->tokenizer;
    size_t slen = 0;
    for (int i = 0; i < n; i++) if (msgs[i].role == ROLE_SYSTEM) slen += msgs[i].len + 2;
    char *system = xcalloc(slen + 1, 1);
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        if (msgs[i].role != ROLE_SYSTEM) continue;
        if (o) { memcpy(system + o, "\n\n", 2); o += 2; }
        memcpy(system + o, msgs[i].content, msgs[i].len);
        o += msgs[i].len;
    }
    ids_push(out, m->config.bos_id);
    int expect = ROLE_USER, first_user = 1;
    for (int i = 0; i < n; i++) {
        const Message *msg = &msgs[i];
        if (msg->role == ROLE_SYSTEM) continue;
        if (msg->role != expect)
            die("%s: message %d is from the %s, but a conversation alternates user, assistant, user, ...", path, i,
                msg->role == ROLE_USER ? "user" : "assistant");
        if (msg->role == ROLE_USER) {
            format_user(out, t, first_user ? system : NULL, msg->content, msg->len);
            first_user = 0;
            expect = ROLE_ASSISTANT;
        } else {
            ids_push_text(out, t, msg->content, msg->len);
            ids_push(out, m->config.eos_id);
            expect = ROLE_USER;
        }
    }
    free(system);
}

// --- a strict little JSON reader, for conversation files -------------------

typedef struct { const char *s; size_t n, i; const char *path; } Json;

static void json_fail(const Json *j, const char *what) {
    size_t line = 1, col = 1;
    for (size_t k = 0; k < j->i && k < j->n; k++) { if (j->s[k] == '\n') { line++; col = 1; } else col++; }
    die("%s: malformed JSON at line %zu, column %zu (byte %zu): %s", j->path, line, col, j->i, what);
}

static void json_ws(Json *j) {
    while (j->i < j->n && strchr(" \t\r\n", j->s[j->i]) && j->s[j->i]) j->i++;
}

static int json_peek(Json *j) { json_ws(j); return j->i < j->n ? (unsigned char)j->s[j->i] : -1; }

static void json_expect(Json *j, char c) {
    if (json_peek(j) != (unsigned char)c) {
        char msg[32];
        snprintf(msg, sizeof(msg), "expected '%c'", c);
        json_fail(j, msg);
    }
    j->i++;
}

static unsigned json_hex4(Json *j) {
    unsigned v = 0;
    for (int k = 0; k < 4; k++, j->i++) {
        char c = j->i < j->n ? j->s[j->i] : 0;
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) json_fail(j, "bad \\u escape");
        v = v * 16 + d;
    }
    return v;
}

// Reads a string into a malloc'd UTF-8 buffer (NUL-terminated; may contain NULs).
static char *json_string(Json *j, size_t *len) {
    json_expect(j, '"');
    char *out = xcalloc(j->n - j->i + 1, 1); // decoded text is never longer than its source
    size_t o = 0;
    for (;;) {
        if (j->i >= j->n) json_fail(j, "unterminated string");
        unsigned char c = j->s[j->i++];
        if (c == '"') break;
        if (c < 0x20) { j->i--; json_fail(j, "control character in string"); }
        if (c != '\\') { out[o++] = c; continue; }
        if (j->i >= j->n) json_fail(j, "unterminated string");
        char e = j->s[j->i++];
        const char *plain = strchr("\"\\/bfnrt", e);
        if (plain && e) { out[o++] = "\"\\/\b\f\n\r\t"[plain - "\"\\/bfnrt"]; continue; }
        if (e != 'u') { j->i--; json_fail(j, "bad escape"); }
        unsigned cp = json_hex4(j);
        if (cp >= 0xD800 && cp < 0xDC00 && j->i + 1 < j->n && j->s[j->i] == '\\' && j->s[j->i + 1] == 'u') {
            size_t save = j->i;
            j->i += 2;
            unsigned lo = json_hex4(j);
            if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            else j->i = save;
        }
        if (cp >= 0xD800 && cp < 0xE000) cp = 0xFFFD; // a lone surrogate
        if (cp < 0x80) out[o++] = cp;
        else if (cp < 0x800) { out[o++] = 0xC0 | cp >> 6; out[o++] = 0x80 | (cp & 63); }
        else if (cp < 0x10000) { out[o++] = 0xE0 | cp >> 12; out[o++] = 0x80 | (cp >> 6 & 63); out[o++] = 0x80 | (cp & 63); }
        else { out[o++] = 0xF0 | cp >> 18; out[o++] = 0x80 | (cp >> 12 & 63); out[o++] = 0x80 | (cp >> 6 & 63); out[o++] = 0x80 | (cp & 63); }
    }
    *len = o;
    return out;
}

// After an element of an array or object: 1 if another follows, 0 at the end.
static int json_more(Json *j, char close) {
    int c = json_peek(j);
    if (c == ',') {
        j->i++;
        if (json_peek(j) == (unsigned char)close) json_fail(j, "trailing comma");
        return 1;
    }
    if (c == (unsigned char)close) { j->i++; return 0; }
    char msg[32];
    snprintf(msg, sizeof(msg), "expected ',' or '%c'", close);
    json_fail(j, msg);
    return 0;
}

// Opens an array or object; 1 if it has elements.
static int json_open(Json *j, char open, char close) {
    json_expect(j, open);
    if (json_peek(j) == (unsigned char)close) { j->i++; return 0; }
    return 1;
}

static void json_skip(Json *j, int depth) {
    if (depth > 64) json_fail(j, "nested too deeply");
    int c = json_peek(j);
    size_t len;
    if (c == '"') { free(json_string(j, &len)); return; }
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        if (json_open(j, (char)c, close)) do {
            if (c == '{') { free(json_string(j, &len)); json_expect(j, ':'); }
            json_skip(j, depth + 1);
        } while (json_more(j, close));
        return;
    }
    size_t start = j->i; // a number or a literal
    while (j->i < j->n && (strchr("+-.eE", j->s[j->i]) || (j->s[j->i] >= '0' && j->s[j->i] <= '9') ||
                           (j->s[j->i] >= 'a' && j->s[j->i] <= 'z'))) j->i++;
    size_t n = j->i - start;
    const char *v = j->s + start;
    int literal = (n == 4 && !memcmp(v, "true", 4)) || (n == 5 && !memcmp(v, "false", 5)) || (n == 4 && !memcmp(v, "null", 4));
    if (n == 0 || (!literal && !((v[0] >= '0' && v[0] <= '9') || v[0] == '-'))) { j->i = start; json_fail(j, "expected a value"); }
}

// Reads {"messages": [{"role": ..., "content": ...}, ...]}; returns the count.
static int read_conversation(const char *path, Message **out) {
    Json j = {0};
    j.s = read_file(path, &j.n);
    j.path = path;
    int n = 0, cap = 8, found = 0;
    Message *msgs = xcalloc(cap, sizeof(Message));
    if (json_open(&j, '{', '}')) do {
        size_t klen;
        char *key = json_string(&j, &klen);
        json_expect(&j, ':');
        if (strcmp(key, "messages") == 0) {
            found = 1;
            if (json_open(&j, '[', ']')) do {
                Message msg = {-1, NULL, 0};
                if (json_open(&j, '{', '}')) do {
                    size_t flen, vlen;
                    char *field = json_string(&j, &flen);
                    json_expect(&j, ':');
                    if (!strcmp(field, "role") || !strcmp(field, "content")) {
                        if (json_peek(&j) != '"') json_fail(&j, "expected a string");
                        char *v = json_string(&j, &vlen);
                        if (!strcmp(field, "content")) { free(msg.content); msg.content = v; msg.len = vlen; }
                        else {
                            msg.role = !strcmp(v, "system") ? ROLE_SYSTEM : !strcmp(v, "user") ? ROLE_USER
                                     : !strcmp(v, "assistant") ? ROLE_ASSISTANT : -2;
                            if (msg.role == -2) die("%s: message %d: unknown role \"%s\" (system, user or assistant)", path, n, v);
                            free(v);
                        }
                    } else json_skip(&j, 0);
                    free(field);
                } while (json_more(&j, '}'));
                if (msg.role < 0 || !msg.content) die("%s: message %d needs a \"role\" and a \"content\" string", path, n);
                if (n == cap) { cap *= 2; if (!(msgs = realloc(msgs, cap * sizeof(Message)))) die("out of memory"); }
                msgs[n++] = msg;
            } while (json_more(&j, ']'));
        } else json_skip(&j, 0);
        free(key);
    } while (json_more(&j, '}'));
    if (json_peek(&j) != -1) json_fail(&j, "trailing characters after the object");
    if (!found) die("%s: no \"messages\" array", path);
    free((void *)j.s);
    *out = msgs;
    return n;
}

// Reads one line of any length from stdin; NULL at end of input.
static char *read_line(size_t *len) {
    size_t cap = 256, n = 0;
    char *s = xcalloc(cap, 1);
    int c;
    while ((c = getchar()) != EOF && c != '\n') {
        if (n + 1 == cap) { cap *= 2; if (!(s = realloc(s, cap))) die("out of memory"); }
        s[n++] = (char)c;
    }
    if (c == EOF && n == 0) { free(s); return NULL; }
    s[n] = 0;
    *len = n;
    return s;
}

static void print_context_full(const State *s) {
    fprintf(stderr, "\n[the context of %d tokens is full. Type /reset to start a new conversation, "
                    "or restart with a larger -c]\n", s->max_pos);
}

// Interactive chat. The KV cache persists between turns, so each turn runs only
// its new tokens through the model.
static void chat(Model *m, State *s, Sampler *sm, const char *system, const char *conv_path, int steps) {
    const Config *p = &m->config;
    IdList turn = {0};
    int pos = 0, replied = 0; // replied: an assistant reply whose EOS is not yet in the cache
    if (conv_path) { // pick up a saved conversation
        Message *msgs;
        int n = read_conversation(conv_path, &msgs);
        format_conversation(&turn, m, msgs, n, conv_path);
        int last_is_user = 0;
        for (int i = 0; i < n; i++) if (msgs[i].role != ROLE_SYSTEM) last_is_user = msgs[i].role == ROLE_USER;
        for (int i = 0; i < n; i++) free(msgs[i].content);
        free(msgs);
        if (turn.n > s->max_pos) die("%s is %d tokens but the context holds %d; use a larger -c", conv_path, turn.n, s->max_pos);
        feed(m, s, turn.ids, turn.n, &pos);
        if (last_is_user) {
            printf("Assistant: ");
            Reply r = reply(m, s, sm, steps, &pos, NULL);
            printf("\n");
            if (r.context_full) print_context_full(s);
            replied = 1;
        }
        system = NULL; // it belonged to the file's first user message
    }
    for (;;) {
        printf("User: ");
        fflush(stdout);
        size_t len;
        char *line = read_line(&len);
        if (!line || !strcmp(line, "/quit")) { free(line); break; }
        if (!strcmp(line, "/reset")) {
            pos = 0;
            replied = 0;
            printf("[new conversation]\n");
            free(line);
            continue;
        }
        turn.n = 0;
        if (pos == 0) ids_push(&turn, p->bos_id);
        if (replied) ids_push(&turn, p->eos_id); // closes the previous reply
        format_user(&turn, &m->tokenizer, pos == 0 ? system : NULL, line, len);
        free(line);
        if (pos + turn.n >= s->max_pos) { print_context_full(s); continue; }
        double t0 = time_s();
        feed(m, s, turn.ids, turn.n, &pos);
        double t_in = time_s() - t0;
        printf("Assistant: ");
        Reply r = reply(m, s, sm, steps, &pos, NULL);
        printf("\n");
        replied = 1;
        if (r.context_full) print_context_full(s);
        // only this turn's tokens went through the model: the cache holds the rest
        fprintf(stderr, "[%d new tokens in, %.2f tok/s; %d out, %.2f tok/s; context %d/%d]\n", turn.n,
                turn.n / (t_in > 0 ? t_in : 1e-9), r.tokens, r.tokens / (r.seconds > 0 ? r.seconds : 1e-9), pos,
                s->max_pos);
    }
    free(turn.ids);
}

// --bench: a 128-token prompt of fixed pseudo-random ids, then 64 greedy
// tokens (EOS does not stop it). Decode speed is reported with the bytes of
// weights and cache it read, and the closing JSON line is for scripts.
static void bench(Model *m, State *s, int threads) {
    const Config *p = &m->config;
    enum { PROMPT = 128, DECODE = 64 };
    if (s->max_pos < PROMPT + DECODE) die("--bench needs a context of at least %d tokens (-c)", PROMPT + DECODE);
    int ids[PROMPT];
    uint64_t rng = 0x2545F4914F6CDD1DULL;
    ids[0] = p->bos_id;
    for (int i = 1; i < PROMPT; i++) ids[i] = (int)(random_u32(&rng) % (uint32_t)p->vocab_size);
    // Warm-up, as llama-bench has one: touch every page of the file once, so
    // that the timings measure the engine rather than the kernel mapping the
    // weights into this process on their first use.
    for (uint64_t at = 0; at < m->map_size; at += 4096) (void)((const volatile uint8_t *)m->map)[at];
    int pos = 0;
    double t0 = time_s();
    feed(m, s, ids, PROMPT, &pos);
    double t1 = time_s();
    uint64_t bytes0 = s->bytes_read;
    for (int i = 0; i < DECODE; i++) forward(m, s, argmax(s->logits, p->vocab_size), pos++);
    double t2 = time_s();
    double prefill = PROMPT / (t1 - t0), decode = DECODE / (t2 - t1);
    double bytes = (double)(s->bytes_read - bytes0) / DECODE;
    fprintf(stderr, "%s weights, %s kernels, %d threads: prefill %.2f tok/s, decode %.2f tok/s, "
                    "%.1f MB read per token, %.2f GB/s\n", weight_type_name[p->weight_type], SIMD_NAME, threads,
            prefill, decode, bytes / 1e6, bytes * decode / 1e9);
    printf("{\"prefill_tok_s\": %.3f, \"decode_tok_s\": %.3f, \"threads\": %d, \"bytes_per_token\": %.0f, "
           "\"gb_per_s\": %.3f, \"weight_type\": \"%s\", \"kernels\": \"%s\"}\n",
           prefill, decode, threads, bytes, bytes * decode / 1e9, weight_type_name[p->weight_type], SIMD_NAME);
}

// Parses "1,415,2936" (commas or spaces) into ids, checking every one against
// the vocabulary; `flag` names the option in error messages.
static IdList parse_ids(const char *flag, const char *str, int vocab_size) {
    IdList ids = {0};
    const char *c = str;
    while (*c) {
        char *end;
        errno = 0;
        long v = strtol(c, &end, 10);
        if (end == c || errno) die("%s: expected token ids separated by commas or spaces, got \"%s\"", flag, c);
        if (v < 0 || v >= vocab_size) die("%s: token id %ld is outside the vocabulary 0..%d", flag, v, vocab_size - 1);
        ids_push(&ids, (int)v);
        c = end;
        while (*c == ',' || *c == ' ') c++;
    }
    return ids;
}

// Test hooks for the tokenizer: the ids of a file's exact bytes (no BOS), and
// the text of a list of ids, each on one line of stdout.
static void tokenize_file(const Tokenizer *t, const char *path) {
    size_t len;
    char *text = read_file(path, &len);
    int *ids;
    int n = tokenizer_encode(t, text, len, &ids);
    if (n < 0) die("out of memory tokenizing %s", path);
    for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    printf("\n");
    free(ids);
    free(text);
}

static void detokenize(const Tokenizer *t, const char *list) {
    IdList ids = parse_ids("--detokenize", list, t->vocab_size);
    char *buf = xcalloc(decoder_max_bytes(t), 1);
    TokenDecoder dec;
    decoder_init(&dec);
    for (int i = 0; i < ids.n; i++) fwrite(buf, 1, decoder_put(&dec, t, ids.ids[i], buf), stdout);
    fwrite(buf, 1, decoder_flush(&dec, buf), stdout);
    printf("\n");
    free(buf);
    free(ids.ids);
}

// The test hook: logits after every input position, raw little-endian f32 (n, V);
// optionally the chosen experts, int32 (n, n_layers, top_k).
static void dump_logits(Model *m, State *s, const int *ids, int n,
                        const char *logits_path, const char *experts_path) {
    const Config *p = &m->config;
    if (n > s->max_pos) die("%d ids but the context holds %d; use a larger -c", n, s->max_pos);
    FILE *f = fopen(logits_path, "wb");
    if (!f) die("cannot write %s: %s", logits_path, strerror(errno));
    FILE *fe = NULL;
    if (experts_path && !(fe = fopen(experts_path, "wb"))) die("cannot write %s: %s", experts_path, strerror(errno));
    for (int pos = 0; pos < n; pos += s->chunk) {
        int c = n - pos < s->chunk ? n - pos : s->chunk;
        float *logits = forward_chunk(m, s, ids + pos, c, pos, 1);
        size_t nl = (size_t)c * p->vocab_size, ne = (size_t)c * p->n_layers * p->top_k;
        if (fwrite(logits, sizeof(float), nl, f) != nl) die("cannot write %s: %s", logits_path, strerror(errno));
        if (fe && fwrite(s->chosen, sizeof(int), ne, fe) != ne) die("cannot write %s: %s", experts_path, strerror(errno));
    }
    if (fclose(f) != 0) die("cannot write %s: %s", logits_path, strerror(errno));
    if (fe && fclose(fe) != 0) die("cannot write %s: %s", experts_path, strerror(errno));
}

// ----------------------------------------------------------------------------
// 9. command line

static void print_usage(void) {
    fprintf(stderr,
        "usage: mixtral MODEL.bin [options]\n"
        "  -i, --prompt TEXT     prompt (default: empty, generation starts from BOS)\n"
        "  -n, --steps N         tokens to generate (default 256)\n"
        "  -t, --temp T          temperature, 0 = greedy (default 1.0)\n"
        "  -p, --top-p P         nucleus sampling threshold, 1 = off (default 0.9)\n"
        "  -s, --seed N          random seed (default: time)\n"
        "  -c, --context N       KV-cache length in tokens (default min(4096, model max))\n"
        "  -m, --mode MODE       generate or chat (default generate)\n"
        "  -y, --system TEXT     chat: system prompt, placed before the first user message\n"
        "      --chat-file F     chat: continue the conversation in F, a JSON object\n"
        "                        {\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}]}\n"
        "      --chat-ids-file F print the token ids (BOS included) conversation F formats to, and exit\n"
        "      --threads N       threads (default: all online CPUs)\n"
        "      --chunk N         prompt tokens processed together, each expert once per chunk (default 128)\n"
        "      --info            print the model's configuration and exit\n"
        "      --expert-stats    after generating, print per-layer expert usage and routing entropy\n"
        "      --trace-experts   after generating, print each token's experts and weights per layer\n"
        "      --bench           time a 128-token prompt and 64 generated tokens; ends with a JSON line\n"
        "test hooks:\n"
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

static float parse_float(const char *flag, const char *v, float lo, float hi) {
    char *end;
    errno = 0;
    float x = strtof(v, &end);
    if (end == v || *end || errno || !(x >= lo && x <= hi)) die("%s: expected a number in %g..%g, got \"%s\"", flag, lo, hi, v);
    return x;
}

#ifndef MIXTRAL_NO_MAIN
int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') { print_usage(); die("the first argument must be a model file"); }
    const char *model_path = argv[1], *prompt = "", *ids_arg = NULL;
    const char *logits_path = NULL, *experts_path = NULL, *tokenize_path = NULL, *detokenize_ids = NULL;
    const char *mode = "generate", *system = NULL, *chat_path = NULL, *chat_ids_path = NULL;
    int steps = 256, context = 0, threads = (int)sysconf(_SC_NPROCESSORS_ONLN), info = 0, do_bench = 0, stats = 0, trace = 0, chunk = 128;
    float temperature = 1.0f, topp = 0.9f;
    uint64_t seed = (uint64_t)time(NULL);
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--info")) { info = 1; continue; }
        if (!strcmp(a, "--bench")) { do_bench = 1; continue; }
        if (!strcmp(a, "--expert-stats")) { stats = 1; continue; }
        if (!strcmp(a, "--trace-experts")) { trace = 1; continue; }
        if (i + 1 >= argc) { print_usage(); die("%s needs a value", a); }
        const char *v = argv[++i];
        if (!strcmp(a, "-i") || !strcmp(a, "--prompt")) prompt = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--steps")) steps = (int)parse_int(a, v, 0, INT_MAX);
        else if (!strcmp(a, "-t") || !strcmp(a, "--temp")) temperature = parse_float(a, v, 0.0f, 100.0f);
        else if (!strcmp(a, "-p") || !strcmp(a, "--top-p")) topp = parse_float(a, v, 0.0f, 1.0f);
        else if (!strcmp(a, "-s") || !strcmp(a, "--seed")) seed = (uint64_t)parse_int(a, v, 0, LONG_MAX);
        else if (!strcmp(a, "-c") || !strcmp(a, "--context")) context = (int)parse_int(a, v, 1, INT_MAX);
        else if (!strcmp(a, "-m") || !strcmp(a, "--mode")) mode = v;
        else if (!strcmp(a, "-y") || !strcmp(a, "--system")) system = v;
        else if (!strcmp(a, "--chat-file")) chat_path = v;
        else if (!strcmp(a, "--chat-ids-file")) chat_ids_path = v;
        else if (!strcmp(a, "--threads")) threads = (int)parse_int(a, v, 1, 1024);
        else if (!strcmp(a, "--chunk")) chunk = (int)parse_int(a, v, 1, 4096);
        else if (!strcmp(a, "--ids")) ids_arg = v;
        else if (!strcmp(a, "--dump-logits")) logits_path = v;
        else if (!strcmp(a, "--dump-experts")) experts_path = v;
        else if (!strcmp(a, "--tokenize-file")) tokenize_path = v;
        else if (!strcmp(a, "--detokenize")) detokenize_ids = v;
        else { print_usage(); die("unknown option %s", a); }
    }
    if (strcmp(mode, "generate") && strcmp(mode, "chat")) die("-m: mode must be generate or chat, got \"%s\"", mode);
    if (chat_path && strcmp(mode, "chat")) die("--chat-file needs -m chat");
    if ((logits_path || experts_path) && !ids_arg) die("--dump-logits and --dump-experts need --ids");

    Model model;
    model_load(&model, model_path);
    const Config *p = &model.config;
    if (info) {
        printf("weights %s, dim %d, hidden_dim %d, layers %d, heads %d, kv heads %d, head_dim %d,\n"
               "experts %d, top_k %d, vocab %d, max positions %d, sliding window %d, rope_theta %g, eps %g\n",
               weight_type_name[p->weight_type], p->dim, p->hidden_dim, p->n_layers, p->n_heads, p->n_kv_heads,
               p->head_dim, p->n_experts, p->top_k, p->vocab_size, p->max_seq_len, p->sliding_window,
               p->rope_theta, p->rms_norm_eps);
        model_free(&model);
        return 0;
    }
    if (chat_ids_path) {
        Message *msgs;
        int n = read_conversation(chat_ids_path, &msgs);
        IdList ids = {0};
        format_conversation(&ids, &model, msgs, n, chat_ids_path);
        for (int i = 0; i < ids.n; i++) printf(i ? " %d" : "%d", ids.ids[i]);
        printf("\n");
        for (int i = 0; i < n; i++) free(msgs[i].content);
        free(msgs);
        free(ids.ids);
        model_free(&model);
        return 0;
    }
    if (tokenize_path || detokenize_ids) {
        if (tokenize_path) tokenize_file(&model.tokenizer, tokenize_path);
        if (detokenize_ids) detokenize(&model.tokenizer, detokenize_ids);
        model_free(&model);
        return 0;
    }
    if (context == 0) context = p->max_seq_len < 4096 ? p->max_seq_len : 4096;

    ThreadPool pool;
    pool_init(&pool, threads);
    State state;
    state_init(&state, p, context, chunk, &pool);

    if (do_bench) {
        bench(&model, &state, threads);
    } else if (ids_arg) {
        IdList ids = parse_ids("--ids", ids_arg, p->vocab_size);
        if (ids.n == 0) die("--ids: no token ids given");
        if (!logits_path) die("--ids needs --dump-logits");
        dump_logits(&model, &state, ids.ids, ids.n, logits_path, experts_path);
        free(ids.ids);
    } else {
        Sampler sm = {temperature, topp, seed ? seed : 0x9E3779B97F4A7C15ULL, xcalloc(p->vocab_size, sizeof(ProbId))};
        if (!strcmp(mode, "chat")) chat(&model, &state, &sm, system, chat_path, steps);
        else generate(&model, &state, &sm, prompt, steps, stats, trace);
        free(sm.order);
    }
    state_free(&state, p);
    pool_free(&pool);
    model_free(&model);
    return 0;
}
#endif
