// mixtral.c: inference for Mixtral sparse mixture-of-experts models, in plain C.
//
//   make && ./mixtral model.bin -i "Once upon a time"
//
// One file, in the order a reader meets the model:
//   1. utilities            die(), timing
//   2. the model file       header, validation, weight pointers (mirrors export.py);
//                           the expert cache, for models larger than memory
//   3. state and KV cache   the ring buffer for sliding-window attention
//   4. forward pass         the products on the pool, attention, then the
//                           mixture of experts: route() and moe()
//   5. sampler              repetition penalty, temperature, top-k, min-p, top-p
//   6. generation and chat  text in, text out; --expert-stats, --trace-experts
//   7. command line         main()
// The machine-specific kernels (AVX2, AVX-512, NEON) are in kernels.c behind the
// contract in kernels.h; the thread pool is pool.c; Mistral's chat format and the
// conversation-file reader are chat.c; the tokenizer is tokenizer.c.
//
// Tokens go through the model in chunks (forward_chunk): a prompt many at a
// time, so that each expert's weights are read once per chunk, and decoding one
// at a time, which is the same code with a chunk of one.
//
// Names follow Hugging Face's modeling_mixtral.py and config.json so the two can
// be read side by side: dim = hidden_size, hidden_dim = intermediate_size,
// wq/wk/wv/wo = q/k/v/o_proj, gate = the router, w1/w2/w3 = an expert's matrices.
// Dimension letters: D = dim, H = hidden_dim, Q = n_heads*head_dim,
// KV = n_kv_heads*head_dim, E = n_experts, V = vocab_size, S = KV-cache slots,
// C = tokens in a chunk. In a product, as in BLAS, M is the tokens, N the
// matrix's rows (outputs) and K its inner dimension (inputs).

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "chat.h"
#include "kernels.h"
#include "pool.h"
#include "tokenizer.h"

// ----------------------------------------------------------------------------
// 1. utilities

#ifdef MIXTRAL_FUZZ
#include <setjmp.h>
static jmp_buf die_jump; // the fuzz targets (tests/fuzz) take every die() back here
#endif

// The one way out on bad input: say what was wrong and what to do, exit non-zero.
static void die(const char *fmt, ...) {
#ifdef MIXTRAL_FUZZ
    (void)fmt;
    longjmp(die_jump, 1);
#else
    va_list ap;
    va_start(ap, fmt);
    fputs("mixtral: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
#endif
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) die("out of memory allocating %zu x %zu bytes (try a smaller -c)", n, size);
    return p;
}

// Reads a whole file (any bytes) into a malloc'd buffer.
static char *read_file(const char *path, size_t *len) { // "-": standard input
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
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
    if (f != stdin) fclose(f);
    *len = n;
    return buf;
}

static int stderr_is_tty(void) { return isatty(fileno(stderr)); }

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
// Norms and the router are always f32; each kind of matrix (embed, wq, ..., w2,
// lm_head) has its own type, the same in every layer, listed in the header
// (export.py's MATRIX_TYPES chooses them). How each weight type is stored (q8/q6/q4:
// rows interleaved in groups of 16, an f16 scale per block of 32) is part of the
// kernels' contract, kernels.h.

#define MODEL_MAGIC "MIXTRALC"
#define MODEL_VERSION 4
#define HEADER_SIZE 256
#define WEIGHTS_ALIGN 4096
#define TENSOR_ALIGN 64

// WEIGHT_F32, WEIGHT_BF16, WEIGHT_Q8, WEIGHT_Q4, WEIGHT_Q6: kernels.h
static const char *weight_type_name[] = {"f32", "bf16", "q8", "q4", "q6"};

// The kinds of matrix, in the order of the header's matrix_type (export.py's MATRIX_KINDS).
enum { KIND_EMBED, KIND_WQ, KIND_WK, KIND_WV, KIND_WO, KIND_W1, KIND_W3, KIND_W2, KIND_LM_HEAD, N_KINDS };
static const char *kind_name[N_KINDS] = {"embed", "wq", "wk", "wv", "wo", "w1", "w3", "w2", "lm_head"};

typedef struct {
    char magic[8];          // "MIXTRALC"
    uint32_t version;       // MODEL_VERSION
    uint32_t header_size;   // HEADER_SIZE
    uint32_t weight_type;   // WEIGHT_*: the --type the file was exported with (a name only)
    uint32_t block_size;    // QBLOCK if any matrix is q8/q6/q4, else 0
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
    int32_t row_group;      // QROWS if any matrix is q8/q6/q4, else 0
    float rope_theta;
    float rms_norm_eps;
    uint64_t tokenizer_offset, tokenizer_size;
    uint64_t weights_offset;
    uint64_t file_size;
    uint8_t matrix_type[N_KINDS]; // WEIGHT_* of each kind of matrix, KIND_*
} Config;
_Static_assert(offsetof(Config, matrix_type) == 120 && sizeof(Config) <= HEADER_SIZE,
               "Config must match export.py's HEADER_FORMAT");

// A weight matrix W (rows, cols) stored in one of the weight types (kernels.h).
// In a product it is W (N, K): N = rows outputs, K = cols inputs.
typedef struct {
    const void *data;    // f32 or bf16 rows, or q8/q6/q4 groups of 16 interleaved rows
    int type;            // WEIGHT_*
    int rows, cols;
    uint64_t bytes;      // weight_matrix_bytes(type, rows, cols)
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
    const uint8_t *map;     // the whole file, memory-mapped or read in
    uint64_t map_size;      // the file's size
    int in_memory;          // read in (alloc_size bytes), not mapped
    size_t alloc_size;
    struct ExpertCache *cache; // the experts in a cache of slots (model larger than memory), or NULL
    uint8_t *resident;      // with the cache: everything but the experts, read in (resident_bytes)
    size_t resident_bytes;
} Model;

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
    Matrix m = {NULL, type, rows, cols, weight_matrix_bytes(type, rows, cols)};
    m.data = cursor_take(c, m.bytes);
    return m;
}

static const float *cursor_f32(Cursor *c, uint64_t n) {
    return (const float *)cursor_take(c, n * 4);
}

// Returns the file offset just past the last tensor (the file size it implies).
static uint64_t model_map_weights(const Config *p, Weights *w, const uint8_t *map) {
    Cursor c = {map, p->weights_offset, 0};
    const uint8_t *t = p->matrix_type;
    int D = p->dim, H = p->hidden_dim, E = p->n_experts;
    int Q = p->n_heads * p->head_dim, KV = p->n_kv_heads * p->head_dim;
    w->embed = cursor_matrix(&c, t[KIND_EMBED], p->vocab_size, D);
    for (int l = 0; l < p->n_layers; l++) {
        Layer *L = &w->layers[l];
        L->attn_norm = cursor_f32(&c, D);
        L->wq = cursor_matrix(&c, t[KIND_WQ], Q, D);
        L->wk = cursor_matrix(&c, t[KIND_WK], KV, D);
        L->wv = cursor_matrix(&c, t[KIND_WV], KV, D);
        L->wo = cursor_matrix(&c, t[KIND_WO], D, Q);
        L->ffn_norm = cursor_f32(&c, D);
        L->gate = cursor_f32(&c, (uint64_t)E * D);
        for (int e = 0; e < E; e++) {
            L->experts[e].w1 = cursor_matrix(&c, t[KIND_W1], H, D);
            L->experts[e].w3 = cursor_matrix(&c, t[KIND_W3], H, D);
            L->experts[e].w2 = cursor_matrix(&c, t[KIND_W2], D, H);
        }
    }
    w->norm = cursor_f32(&c, D);
    w->lm_head = cursor_matrix(&c, t[KIND_LM_HEAD], p->vocab_size, D);
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
        {"head_dim", p->head_dim, 1 << 14}, {"n_experts", p->n_experts, 1 << 12},
        {"top_k", p->top_k, 1 << 12}, {"vocab_size", p->vocab_size, 1 << 24},
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
    if (p->top_k > p->n_experts)
        die("%s: corrupt header: top_k %d > n_experts %d; %s", path, p->top_k, p->n_experts, hint);
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

// The number on the line of a Linux /proc file that `format` (a sscanf
// format with one %llu) matches; 0 where there is none.
static uint64_t proc_number(const char *path, const char *format) {
    FILE *f = fopen(path, "r");
    char line[256];
    unsigned long long v = 0;
    while (f && fgets(line, sizeof(line), f))
        if (sscanf(line, format, &v) == 1) break;
    if (f) fclose(f);
    return v;
}

// Memory the system could give this process now without swapping (Linux:
// MemAvailable, which counts the page cache it can drop); 0 if unknown.
static uint64_t available_memory(void) { return proc_number("/proc/meminfo", "MemAvailable: %llu kB") * 1024; }

// Reads the whole file into anonymous memory, in 2 MB pages where the kernel
// allows: with 4 KB pages a core streaming weights misses the TLB every 4 KB,
// and the hardware prefetchers stop at every page boundary (measured on a
// Xeon: 10-30% slower prompts and decoding from a mapped file). Each worker of
// the pool reads a share: the kernel zeroes and fills the pages on every core
// at once (measured: 1.2 GB/s with one thread, 4-7 GB/s with two).
typedef struct { int fd; uint8_t *mem; uint64_t size; int progress; _Atomic uint64_t done; atomic_int failed; } ReadIn;

// Share tid of n of the file, in pieces of 64 MB (shares start on 2 MB pages).
// Worker 0 shows the progress of all, on a terminal.
static void read_job(void *arg, int tid, int n) {
    ReadIn *r = arg;
    uint64_t huge = 2u << 20, lo = r->size * tid / n / huge * huge;
    uint64_t hi = tid + 1 == n ? r->size : r->size * (tid + 1) / n / huge * huge;
    for (uint64_t at = lo; at < hi && !atomic_load(&r->failed);) {
        uint64_t want = hi - at < (64u << 20) ? hi - at : (64u << 20);
        ssize_t got = pread(r->fd, r->mem + at, want, (off_t)at);
        if (got <= 0) { atomic_store(&r->failed, 1); break; }
        at += (uint64_t)got;
        uint64_t done = atomic_fetch_add(&r->done, (uint64_t)got) + (uint64_t)got;
        if (tid == 0 && r->progress) fprintf(stderr, "\r[reading the model: %.1f of %.1f GB]", done / 1e9, r->size / 1e9);
    }
}

static uint8_t *read_in(int fd, uint64_t size, const char *path, ThreadPool *pool, size_t *alloc_size) {
    size_t huge = 2u << 20, bytes = (size_t)((size + huge - 1) / huge * huge);
    void *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("cannot allocate %.2f GB to read %s into (try --mmap)", bytes / 1e9, path);
#ifdef MADV_HUGEPAGE
    madvise(mem, bytes, MADV_HUGEPAGE);
#endif
    ReadIn r = {fd, mem, size, stderr_is_tty() && size > (1u << 30), 0, 0};
    if (pool) pool_run(pool, read_job, &r);
    else read_job(&r, 0, 1);
    if (r.progress) fprintf(stderr, "\r\033[K");
    if (atomic_load(&r.failed)) die("cannot read %s: a read failed or the file got shorter", path);
    *alloc_size = bytes;
    return mem;
}

// The checks on a model file's header (in m->config) against the file's size,
// before any of the file is read: every field, and the size the dimensions
// imply. Then model_attach() points the weights and the tokenizer into the
// file's bytes at m->map. (tests/fuzz/fuzz_model.c runs both on any bytes.)
static void model_check(Model *m, uint64_t size, const char *path) {
    const Config *p = &m->config;
    config_validate(p, size, path);
    Weights *w = &m->weights;
    w->layers = xcalloc(p->n_layers, sizeof(Layer));
    for (int l = 0; l < p->n_layers; l++) w->layers[l].experts = xcalloc(p->n_experts, sizeof(Expert));
    uint64_t end = model_map_weights(p, w, NULL); // measures only
    if (end != size)
        die("%s: the header's dimensions imply %llu bytes of file, the file has %llu; corrupt header? re-run export.py",
            path, (unsigned long long)end, (unsigned long long)size);
}

static void model_attach(Model *m, const char *path) {
    const Config *p = &m->config;
    model_map_weights(p, &m->weights, m->map);
    const char *err = tokenizer_init(&m->tokenizer, m->map + p->tokenizer_offset, p->tokenizer_size, p->vocab_size);
    if (err) die("%s: tokenizer section: %s; re-run export.py", path, err);
}

// --- the expert cache ------------------------------------------------------------
//
// For a model larger than the memory it may use (--mem, or what the system has
// available): everything but the experts is read into memory once (attention,
// norms, routers, embedding, lm_head: a small share of the bytes), and the
// experts live in a fixed number of slots, each holding one expert's w1, w3
// and w2 exactly as they lie in the file. A layer's chosen experts are looked
// up; a miss is read into the least recently used slot (or, with
// --cache-policy usage, the slot of the expert used least often lately), in
// large pread()s on the I/O threads. And while layer l computes, the experts that layer l+1's
// router picks from layer l's hidden state are read ahead (speculative
// prefetch, after Eliseev and Mazur, "Fast Inference of Mixture-of-Experts
// Language Models with Offloading", 2023): the residual stream changes slowly,
// so the guess is often right, and a wrong one costs only a read. The kernels
// read the same bytes from a slot as from the file: the output is identical.
// Reads bypass the page cache where the system allows (O_DIRECT), so that the
// memory holds one copy of an expert, the slot's, not a second in the page cache.

#define CACHE_IO_THREADS 4
#define CACHE_PIECE (4u << 20) // bytes per pread
#define CACHE_ALIGN 4096        // O_DIRECT: offsets, lengths and buffers in whole blocks

typedef struct { int slot; uint64_t file_offset, slot_offset, bytes, need; } Load; // need: bytes before the file ends

typedef struct ExpertCache {
    int fd;                    // the model file
    int direct_fd;             // the same, opened with O_DIRECT, or -1 (then reads go through fd)
    uint64_t file_size;
    int n_layers, n_experts;
    uint64_t *span;            // (L*E) file offset of expert (l, e)'s w1, w3, w2, one span; it lies
                               // in its slot at span % CACHE_ALIGN, as reads start at a block
    uint64_t span_bytes;       // the same for every expert
    uint64_t embed_offset;     // file offset of the embedding (read a row at a time)
    int n_slots;
    size_t slot_bytes;
    uint64_t budget;           // the memory it was given: weights held, slots and working buffers
    uint8_t *slots;            // (n_slots, slot_bytes)
    int *slot_of;              // (L*E) the slot holding (or reading) expert (l, e), or -1
    int *owner;                // (n_slots) the expert l*E+e in the slot, or -1
    uint64_t *last_use;        // (n_slots) the LRU clock when it was last used or read ahead
    uint64_t clock;
    int by_usage;              // --cache-policy usage: evict the expert used least often lately
    float *uses;               // (L*E) uses of each expert, halved every USES_HALF_LIFE lookups
    uint8_t *pinned;           // (n_slots) in use by the layer being computed
    int *pending;              // (n_slots) pieces of its read not yet done (under mu); 0: ready
    uint8_t *guessed;          // (L*E) read ahead for its layer, not yet needed there
    // the I/O threads and their queue of pieces
    pthread_t io[CACHE_IO_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    Load *queue;               // a ring of q_cap pieces
    int q_head, q_n, q_cap, quit, failed;
    int read_errno;            // why a read failed (0: the file ended early)
    int in_flight;             // pieces queued or being read
    double busy_since, busy_seconds; // wall time with reads in flight: for the read speed
    // what --expert-stats and the summary report
    uint64_t hits, misses, prefetched, prefetch_used, bytes_read;
    double wait_seconds;       // time the forward pass waited for reads
} ExpertCache;

static void *cache_io_thread(void *arg) {
    ExpertCache *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->quit && c->q_n == 0) pthread_cond_wait(&c->work, &c->mu);
        if (c->quit) break;
        Load ld = c->queue[c->q_head];
        c->q_head = (c->q_head + 1) % c->q_cap;
        c->q_n--;
        pthread_mutex_unlock(&c->mu);
        uint8_t *to = c->slots + (size_t)ld.slot * c->slot_bytes + ld.slot_offset;
        uint64_t got = 0;
        int err = 0;
        int fd = c->direct_fd >= 0 ? c->direct_fd : c->fd;
        while (got < ld.need) {
            ssize_t r = pread(fd, to + got, ld.bytes - got, (off_t)(ld.file_offset + got));
            if (r < 0 && errno == EINVAL && fd != c->fd) { fd = c->fd; continue; } // O_DIRECT refused here
            if (r <= 0) { err = r < 0 ? errno : 0; break; }
            got += (uint64_t)r;
        }
        pthread_mutex_lock(&c->mu);
        if (got < ld.need) { c->failed = 1; c->read_errno = err; }
        c->bytes_read += got;
        c->pending[ld.slot]--;
        if (--c->in_flight == 0) c->busy_seconds += time_s() - c->busy_since;
        pthread_cond_broadcast(&c->done);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

// Queues the read of expert x = l*E+e into slot s (under mu).
static void cache_read(ExpertCache *c, int x, int s) {
    if (c->owner[s] >= 0) c->slot_of[c->owner[s]] = -1;
    c->owner[s] = x;
    c->slot_of[x] = s;
    // whole blocks around the span: from the block it starts in to the end of the block it ends in
    uint64_t from = c->span[x] / CACHE_ALIGN * CACHE_ALIGN, end = c->span[x] + c->span_bytes;
    uint64_t bytes = (end + CACHE_ALIGN - 1) / CACHE_ALIGN * CACHE_ALIGN - from;
    for (uint64_t off = 0; off < bytes; off += CACHE_PIECE) {
        if (c->q_n == c->q_cap) die("expert cache: read queue full"); // sized for every slot at once
        uint64_t n = bytes - off < CACHE_PIECE ? bytes - off : CACHE_PIECE, at = from + off;
        uint64_t need = at + n <= c->file_size ? n : c->file_size - at;
        c->queue[(c->q_head + c->q_n++) % c->q_cap] = (Load){s, at, off, n, need};
        c->pending[s]++;
        if (c->in_flight++ == 0) c->busy_since = time_s();
    }
    pthread_cond_broadcast(&c->work);
}

static void cache_failed(const ExpertCache *c) {
    die("expert cache: cannot read the model file: %s", c->read_errno ? strerror(c->read_errno) : "it ended early");
}

// Recent uses of the expert in slot s (-1: the slot is empty).
static float slot_uses(const ExpertCache *c, int s) { return c->owner[s] < 0 ? -1.0f : c->uses[c->owner[s]]; }

// The slot to read into, of those neither in use nor being read, or -1: the
// least recently used, or by usage the least used lately (then the least recent).
static int cache_victim(const ExpertCache *c) {
    int best = -1;
    for (int s = 0; s < c->n_slots; s++) {
        if (c->pinned[s] || c->pending[s] > 0) continue;
        if (best < 0) { best = s; continue; }
        float us = slot_uses(c, s), ub = slot_uses(c, best);
        if (c->by_usage && us != ub) { if (us < ub) best = s; }
        else if (c->last_use[s] < c->last_use[best]) best = s;
    }
    return best;
}

// Counts a use of expert x, for the usage policy: counts halve every
// USES_HALF_LIFE lookups, so the cache follows a change of topic.
#define USES_HALF_LIFE 1024
static void cache_count_use(ExpertCache *c, int x) {
    c->uses[x] += 1.0f;
    if ((c->hits + c->misses) % USES_HALF_LIFE == 0)
        for (int i = 0; i < c->n_layers * c->n_experts; i++) c->uses[i] *= 0.5f;
}

// Reads ahead experts es[0..n) of layer l, into slots no one is using (under mu).
static void cache_prefetch_locked(ExpertCache *c, int l, const int *es, int n) {
    for (int i = 0; i < n; i++) {
        int x = l * c->n_experts + es[i];
        if (c->slot_of[x] >= 0) continue; // there, or on its way
        int s = cache_victim(c);
        if (s < 0) break;
        c->guessed[x] = 1;
        c->prefetched++;
        c->last_use[s] = ++c->clock; // as if used: not the next victim
        cache_read(c, x, s);
    }
}

// Makes experts es[0..n) of layer l ready to use, as many as there are slots for
// (a prefix of es: fewer than n only when the layer needs more experts at once
// than the cache holds), and pins them; out[i] gets expert es[i] with its
// matrices pointing into its slot. Returns how many. Queues the reads ahead of
// ahead[0..n_ahead) for layer l+1 behind its own, then waits for its own.
static int cache_acquire(ExpertCache *c, const Layer *L, int l, const int *es, int n, Expert *out,
                         const int *ahead, int n_ahead) {
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < n; i++) { // what is there already is not a victim for what is not
        int s = c->slot_of[l * c->n_experts + es[i]];
        if (s >= 0) c->pinned[s] = 1;
    }
    int got = 0;
    for (; got < n; got++) {
        int x = l * c->n_experts + es[got], s = c->slot_of[x];
        if (s >= 0) {
            c->hits++;
        } else {
            if ((s = cache_victim(c)) < 0 && got > 0) break; // the rest in a later wave
            if (s < 0) { // none free for the first: the protected ones are for later waves, or reads are in flight
                for (int i = 1; i < n; i++) {
                    int t = c->slot_of[l * c->n_experts + es[i]];
                    if (t >= 0) c->pinned[t] = 0;
                }
                while ((s = cache_victim(c)) < 0 && !c->failed) pthread_cond_wait(&c->done, &c->mu);
                if (c->failed) cache_failed(c);
            }
            c->misses++;
            cache_read(c, x, s);
        }
        if (c->guessed[x]) { c->prefetch_used++; c->guessed[x] = 0; }
        cache_count_use(c, x);
        c->pinned[s] = 1;
        c->last_use[s] = ++c->clock;
    }
    for (int i = got; i < n; i++) { // those for a later wave: unpinned again
        int s = c->slot_of[l * c->n_experts + es[i]];
        if (s >= 0) c->pinned[s] = 0;
    }
    for (int e = 0; e < c->n_experts; e++) c->guessed[l * c->n_experts + e] = 0; // the guesses for l are settled
    if (n_ahead && l + 1 < c->n_layers) cache_prefetch_locked(c, l + 1, ahead, n_ahead); // after this layer's reads
    double t0 = time_s();
    for (int i = 0; i < got; i++)
        while (c->pending[c->slot_of[l * c->n_experts + es[i]]] > 0 && !c->failed) pthread_cond_wait(&c->done, &c->mu);
    c->wait_seconds += time_s() - t0;
    if (c->failed) cache_failed(c);
    for (int i = 0; i < got; i++) { // the expert's matrices, moved from the file's span into the slot
        const Expert *ex = &L->experts[es[i]];
        int x = l * c->n_experts + es[i];
        const uint8_t *base = (const uint8_t *)ex->w1.data;
        const uint8_t *slot = c->slots + (size_t)c->slot_of[x] * c->slot_bytes + c->span[x] % CACHE_ALIGN;
        out[i] = *ex;
        out[i].w1.data = slot;
        out[i].w3.data = slot + ((const uint8_t *)ex->w3.data - base);
        out[i].w2.data = slot + ((const uint8_t *)ex->w2.data - base);
    }
    pthread_mutex_unlock(&c->mu);
    return got;
}

static void cache_release(ExpertCache *c, int l, const int *es, int n) {
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < n; i++) c->pinned[c->slot_of[l * c->n_experts + es[i]]] = 0;
    pthread_mutex_unlock(&c->mu);
}

// Sets up a cache of as many slots as `slot_budget` bytes hold, for the
// experts of a model whose file is mapped at map (for their offsets) and open as fd.
static ExpertCache *cache_init(const Model *m, const char *path, int fd, uint64_t slot_budget) {
    const Config *p = &m->config;
    ExpertCache *c = xcalloc(1, sizeof(ExpertCache));
    int L = p->n_layers, E = p->n_experts;
    c->fd = fd;
    c->file_size = m->map_size;
#ifdef O_DIRECT
    c->direct_fd = open(path, O_RDONLY | O_DIRECT); // where it fails (tmpfs), reads go through the page cache
#else
    c->direct_fd = -1;
    (void)path;
#endif
    c->n_layers = L;
    c->n_experts = E;
    c->span = xcalloc((size_t)L * E, sizeof(uint64_t));
    const Expert *first = &m->weights.layers[0].experts[0];
    c->span_bytes = (const uint8_t *)first->w2.data + first->w2.bytes - (const uint8_t *)first->w1.data;
    for (int l = 0; l < L; l++)
        for (int e = 0; e < E; e++) c->span[l * E + e] = (const uint8_t *)m->weights.layers[l].experts[e].w1.data - m->map;
    c->embed_offset = (const uint8_t *)m->weights.embed.data - m->map;
    c->slot_bytes = (c->span_bytes + 2 * CACHE_ALIGN - 1) / CACHE_ALIGN * CACHE_ALIGN; // the span and its blocks' ends
    c->n_slots = (int)(slot_budget / c->slot_bytes);
    if (c->n_slots > L * E) c->n_slots = L * E;
    if (c->n_slots < 1) return c; // the caller says what is missing
    size_t bytes = (size_t)c->n_slots * c->slot_bytes;
    c->slots = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (c->slots == MAP_FAILED) die("expert cache: cannot allocate %.2f GB of slots", bytes / 1e9);
#ifdef MADV_HUGEPAGE
    madvise(c->slots, bytes, MADV_HUGEPAGE);
#endif
    c->slot_of = xcalloc((size_t)L * E, sizeof(int));
    for (int x = 0; x < L * E; x++) c->slot_of[x] = -1;
    c->owner = xcalloc(c->n_slots, sizeof(int));
    for (int s = 0; s < c->n_slots; s++) c->owner[s] = -1;
    c->last_use = xcalloc(c->n_slots, sizeof(uint64_t));
    c->uses = xcalloc((size_t)L * E, sizeof(float));
    c->pinned = xcalloc(c->n_slots, 1);
    c->pending = xcalloc(c->n_slots, sizeof(int));
    c->guessed = xcalloc((size_t)L * E, 1);
    c->q_cap = (int)(c->n_slots * (c->span_bytes / CACHE_PIECE + 1));
    c->queue = xcalloc(c->q_cap, sizeof(Load));
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work, NULL);
    pthread_cond_init(&c->done, NULL);
    for (int i = 0; i < CACHE_IO_THREADS; i++)
        if (pthread_create(&c->io[i], NULL, cache_io_thread, c) != 0) die("expert cache: cannot start I/O threads");
    return c;
}

static void cache_free(ExpertCache *c) {
    if (!c) return;
    if (c->n_slots >= 1) {
        pthread_mutex_lock(&c->mu);
        c->quit = 1;
        pthread_cond_broadcast(&c->work);
        pthread_mutex_unlock(&c->mu);
        for (int i = 0; i < CACHE_IO_THREADS; i++) pthread_join(c->io[i], NULL);
        munmap(c->slots, (size_t)c->n_slots * c->slot_bytes);
    }
    free(c->span); free(c->slot_of); free(c->owner); free(c->last_use); free(c->uses); free(c->pinned); free(c->pending);
    free(c->guessed); free(c->queue);
    free(c);
}

// Bytes this process has had read from storage so far (Linux: /proc/self/io,
// page faults of a mapping included); 0 where unknown.
static uint64_t storage_read_bytes(void) { return proc_number("/proc/self/io", "read_bytes: %llu"); }

// With the cache, the embedding is not kept in memory: a token's row is read
// from the file (for q8/q6/q4, the group of 16 interleaved rows that holds it).
static void cache_embed_row(ExpertCache *c, const Matrix *embed, int row, float *out) {
    int K = embed->cols;
    uint64_t at, bytes;
    if (weight_is_quant(embed->type)) {
        bytes = quant_group_bytes(embed->type, K);
        at = (uint64_t)(row / QROWS) * bytes;
    } else {
        bytes = (uint64_t)K * (embed->type == WEIGHT_F32 ? 4 : 2);
        at = (uint64_t)row * bytes;
    }
    uint8_t *buf = xcalloc(bytes, 1);
    uint64_t from = c->embed_offset + at;
    for (uint64_t got = 0; got < bytes;) {
        ssize_t r = pread(c->fd, buf + got, bytes - got, (off_t)(from + got));
        if (r <= 0) die("cannot read the embedding from the model file: %s", r < 0 ? strerror(errno) : "end of file");
        got += (uint64_t)r;
    }
    dequant_row(embed->type, buf, K, weight_is_quant(embed->type) ? row % QROWS : 0, out);
    free(buf);
}

// One line on the cache, for --expert-stats and the run's summary.
// Waits for the reads in flight (reads ahead may outlive the token that
// asked for them): after it, the statistics can be read without the lock.
static void cache_settle(ExpertCache *c) {
    pthread_mutex_lock(&c->mu);
    while (c->in_flight > 0 && !c->failed) pthread_cond_wait(&c->done, &c->mu);
    pthread_mutex_unlock(&c->mu);
}

static void cache_report(ExpertCache *c, FILE *out) {
    cache_settle(c);
    uint64_t lookups = c->hits + c->misses;
    fprintf(out, "expert cache: %d slots of %.0f MB (budget %.0f MB); hit rate %.1f%% (%llu of %llu); prefetch accuracy %.1f%% "
                 "(%llu of %llu read ahead were used); read %.0f MB at %.0f MB/s; waited %.2f s\n",
            c->n_slots, c->slot_bytes / 1e6, c->budget / 1e6, lookups ? 100.0 * c->hits / lookups : 0.0, (unsigned long long)c->hits,
            (unsigned long long)lookups, c->prefetched ? 100.0 * c->prefetch_used / c->prefetched : 0.0,
            (unsigned long long)c->prefetch_used, (unsigned long long)c->prefetched, c->bytes_read / 1e6,
            c->busy_seconds > 0 ? c->bytes_read / 1e6 / c->busy_seconds : 0.0, c->wait_seconds);
}

// With the expert cache: every weight but the experts and the embedding read
// into memory of the process (the file stays mapped only to find offsets;
// nothing reads through the mapping), so that they stay resident whatever the
// page cache does. The embedding, of which a token needs one row, is read a
// row at a time (cache_embed_row).
static void keep_resident(Model *m, int fd, const char *path) {
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
    size_t total = 0;
    for (int i = 0; i < n; i++) total += (size[i] + 63) / 64 * 64;
    m->resident_bytes = (total + 4095) / 4096 * 4096;
    m->resident = mmap(NULL, m->resident_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m->resident == MAP_FAILED) die("cannot allocate %.2f GB for the weights besides the experts", total / 1e9);
#ifdef MADV_HUGEPAGE
    madvise(m->resident, m->resident_bytes, MADV_HUGEPAGE);
#endif
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        uint64_t from = (const uint8_t *)*ptr[i] - m->map;
        for (uint64_t got = 0; got < size[i];) {
            ssize_t r = pread(fd, m->resident + at + got, size[i] - got, (off_t)(from + got));
            if (r <= 0) die("cannot read %s: %s", path, r < 0 ? strerror(errno) : "the file got shorter");
            got += (uint64_t)r;
        }
        *ptr[i] = m->resident + at;
        at += (size[i] + 63) / 64 * 64;
    }
    free(ptr);
    free(size);
}

// How the model gets into memory: read into the process (LOAD_READ), mapped
// (LOAD_MMAP: instant, shared with the page cache, but 4 KB pages), or read
// when it fits in the memory available (LOAD_AUTO).
enum { LOAD_AUTO, LOAD_MMAP, LOAD_READ };

static void model_load(Model *m, const char *path, int load, ThreadPool *pool, uint64_t mem, int context, int chunk) {
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
    if (pread(fd, head, sizeof(head), 0) < 0) die("cannot read %s: %s", path, strerror(errno));
    refuse_other_formats(path, head, size);
    if (size < HEADER_SIZE) die("%s is %llu bytes, too small to be a model file; re-run export.py", path, (unsigned long long)size);
    if (pread(fd, &m->config, sizeof(Config), 0) != (ssize_t)sizeof(Config)) die("cannot read %s: %s", path, strerror(errno));
    model_check(m, size, path);
    m->map_size = size;
    uint64_t avail = available_memory();
    // the expert cache: when --mem is less than the file, or (by default) the file is more than the memory available
    int cached = mem ? mem < size : load == LOAD_AUTO && avail && size + size / 8 > avail;
    m->in_memory = !cached && (load == LOAD_READ || (load == LOAD_AUTO && size + size / 8 < avail));
    m->map = m->in_memory ? read_in(fd, size, path, pool, &m->alloc_size) : mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m->map == MAP_FAILED) die("cannot mmap %s: %s", path, strerror(errno));
    model_attach(m, path);
    if (!cached) { close(fd); return; }
    // The budget holds the weights in memory and the working buffers; the KV
    // cache comes on top. By default: what is available, less the KV cache and a
    // reserve of 1/32 (the cache reads around the page cache: it needs none of it).
    const Config *p = &m->config;
    uint64_t slots = context ? (uint64_t)context : (uint64_t)(p->max_seq_len < 4096 ? p->max_seq_len : 4096);
    if (p->sliding_window > 0 && (uint64_t)p->sliding_window < slots) slots = (uint64_t)p->sliding_window;
    uint64_t kv_bytes = 2 * (uint64_t)p->n_layers * slots * p->n_kv_heads * p->head_dim * sizeof(float);
    uint64_t C = (uint64_t)chunk, D = p->dim, H = p->hidden_dim, Q = (uint64_t)p->n_heads * p->head_dim, K = p->top_k;
    uint64_t work = 4 * (C * (3 * D + 2 * Q + 2 * K * D + 2 * K * H + p->vocab_size) + (uint64_t)p->n_heads * slots) +
                    (uint64_t)p->n_experts * C * (D > H ? D : H) * 5 / 4 + // the state's buffers (state_init)
                    (uint64_t)pool->n * quant_scratch_bytes(C, D > H ? D : H) +  // the kernels' buffers, per thread
                    (uint64_t)p->vocab_size * 32 + (2u << 20);             // the tokenizer's tables, code and libc
    uint64_t given = mem ? mem : avail - avail / 32 > kv_bytes ? avail - avail / 32 - kv_bytes : 0;
    uint64_t budget = given > work ? given - work : 0;
    keep_resident(m, fd, path);
    if (budget < m->resident_bytes) budget = m->resident_bytes; // (no slot: reported below)
    m->cache = cache_init(m, path, fd, budget - m->resident_bytes);
    m->cache->budget = given;
    const ExpertCache *c = m->cache;
    if (c->n_slots < 1)
        die("%s: %.1f MB of memory is too little: the working buffers take %.1f MB, the weights other than the "
            "experts %.1f MB, and one expert %.1f MB more (give --mem a larger size)", path, given / 1e6,
            work / 1e6, m->resident_bytes / 1e6, c->slot_bytes / 1e6);
}

static void model_free(Model *m) {
    for (int l = 0; l < m->config.n_layers; l++) free(m->weights.layers[l].experts);
    free(m->weights.layers);
    tokenizer_free(&m->tokenizer);
    munmap((void *)m->map, m->in_memory ? m->alloc_size : m->map_size);
    if (m->cache) {
        close(m->cache->fd);
        if (m->cache->direct_fd >= 0) close(m->cache->direct_fd);
        cache_free(m->cache);
        munmap(m->resident, m->resident_bytes);
    }
}

// ----------------------------------------------------------------------------
// 3. state and KV cache
//
// Each layer keeps the keys and values of past positions in S slots. Without
// a sliding window S is the context length and position p lives in slot p.
// With a window W (and W <= context), S = W and position p lives in slot p % W:
// a ring buffer. The query at p needs keys p-W+1..p, exactly the W slots, so
// the slot being overwritten (p-W) is the one that just fell out of the window,
// and memory stays bounded however long generation runs. The slots of each kv
// head lie one after another, so that attention reads a head's keys (and
// values) as one sequential stream.

// The input of a batch's products quantized for q8/q6/q4 weights (kernels.h's
// QuantX), with the f32 input it was made from, so that products sharing an
// input (wq, wk, wv; an expert's w1 and w3) quantize it once.
typedef struct {
    QuantX qx;        // (M, K) int8 blocks, their scales and sums
    const float *x;   // (M, K) what was quantized
    int64_t blocks;   // M * K / QBLOCK
} QuantInput;

typedef struct {
    int chunk;         // C: most tokens run through the model together (1 when decoding)
    float *x;          // (C, D) the residual stream
    float *xb;         // (C, D) normed input of a block
    float *xb2;        // (C, D) attention output after wo
    float *q;          // (C, Q)
    float *k, *v;      // (C, KV) the chunk's keys and values, before they join the cache
    float *att_out;    // (C, Q) attention output, before wo
    float *att;        // (n_heads, S) attention scores of one query
    // the mixture of experts works on (token, expert) pairs sorted by expert: row j
    // of these buffers is pair j; an expert's pairs are consecutive rows
    float *moe_in;     // (C*top_k, D) the pair's token's normed input
    float *hb, *hb2;   // (C*top_k, H) the expert's hidden activations
    float *moe_out;    // (C*top_k, D) the expert's output
    int *pair_token;   // (C*top_k,) which token of the chunk
    float *pair_weight; // (C*top_k,) its routing weight
    float *router;     // (E,) router logits, then their softmax
    float *rope_inv_freq; // (head_dim/2,)
    float *logits;     // (C, V)
    float *key_cache;   // (n_layers, n_kv_heads, S, head_dim)
    float *value_cache; // (n_layers, n_kv_heads, S, head_dim)
    int n_slots;        // S
    int max_pos;        // positions 0..max_pos-1 may be computed
    int *chosen;        // (C, n_layers, top_k) experts picked for each token of the last chunk
    float *chosen_w;    // (C, n_layers, top_k) their routing weights
    QuantInput *xq;     // (n_experts,) a batch's inputs quantized for q8/q6/q4 weights, C rows each
    ThreadPool *pool;
    struct ExpertCache *cache; // the model's expert cache, or NULL
    uint64_t bytes_read; // weight and cache bytes read so far (for --bench)
    // routing statistics (--expert-stats), over every token run through the model
    uint64_t *expert_count;  // (n_layers, E) times each expert was chosen
    double *router_entropy;  // (n_layers,) sum over tokens of the router softmax's entropy, bits
    uint64_t tokens_routed;
} State;

static void state_init(State *s, const Config *p, int context, int chunk, ThreadPool *pool) {
    size_t D = p->dim, H = p->hidden_dim, top_k = p->top_k, E = p->n_experts, C = chunk;
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
    s->moe_in = xcalloc(C * top_k * D, sizeof(float));
    s->hb = xcalloc(C * top_k * H, sizeof(float));
    s->hb2 = xcalloc(C * top_k * H, sizeof(float));
    s->moe_out = xcalloc(C * top_k * D, sizeof(float));
    s->pair_token = xcalloc(C * top_k, sizeof(int));
    s->pair_weight = xcalloc(C * top_k, sizeof(float));
    s->router = xcalloc(E, sizeof(float));
    s->logits = xcalloc(C * p->vocab_size, sizeof(float));
    s->key_cache = xcalloc((size_t)p->n_layers * s->n_slots * KV, sizeof(float));
    s->value_cache = xcalloc((size_t)p->n_layers * s->n_slots * KV, sizeof(float));
    s->chosen = xcalloc(C * p->n_layers * top_k, sizeof(int));
    s->chosen_w = xcalloc(C * p->n_layers * top_k, sizeof(float));
    s->expert_count = xcalloc((size_t)p->n_layers * E, sizeof(uint64_t));
    s->router_entropy = xcalloc(p->n_layers, sizeof(double));
    s->xq = xcalloc(E, sizeof(QuantInput));
    if (p->block_size) { // q8/q6/q4 weights: room for C tokens (an expert's most) of the widest input
        size_t widest = D > H ? D : H;
        widest = widest > Q ? widest : Q;
        for (size_t e = 0; e < E; e++) {
            s->xq[e].qx.q = xcalloc(C * widest, 1);
            s->xq[e].qx.scale = xcalloc(C * widest / QBLOCK, sizeof(float));
            s->xq[e].qx.qoff = xcalloc(2 * C * widest / QBLOCK, sizeof(int32_t));
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
    for (int e = 0; e < p->n_experts; e++) { free(s->xq[e].qx.q); free(s->xq[e].qx.scale); free(s->xq[e].qx.qoff); }
    free(s->xq);
    free(s->chosen);
    free(s->pair_token);
    free(s->expert_count);
    free(s->router_entropy);
}

// ----------------------------------------------------------------------------
// 4. forward pass

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

// --- the matrix products, on the pool ----------------------------------------
//
// Nearly all the time of a token goes to products with weight matrices, which
// read every active weight once. They run in batches: all products that do not
// depend on each other (q, k and v; the up projections of every chosen expert)
// in one round of the pool. The kernels themselves are in kernels.c.

// One product of a batch, a small GEMM: out (M, N) = x (M, K) @ W (N, K)^T,
// for the M tokens at once (1 when decoding; for a chunk of prompt the chunk's
// tokens, or an expert's share of them). Each weight row is fetched from
// memory once and used for all M tokens while it sits in the cache.
typedef struct {
    float *out;             // (M, N)
    const float *x;         // (M, K)
    const Matrix *W;        // (N, K)
    int M;
    const QuantInput *xq;   // x quantized, for q8/q6/q4 weights (set by matmul)
} Gemm;

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
        gemm_bf16((const uint16_t *)w + (size_t)r0 * K, K, r1 - r0, g->x, g->M, g->out + r0, N);
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
        if (b0 < b1) quantize_blocks(&j->xq[i].qx, j->xq[i].x, b0, b1);
    }
}

// A batch of products in one round of the pool: g[i].out = g[i].x @ g[i].W^T.
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
        s->bytes_read += W->bytes;
        if (!weight_is_quant(W->type)) continue;
        if (qj.n == 0 || s->xq[qj.n - 1].x != g[i].x) {
            QuantInput *xq = &s->xq[qj.n++];
            xq->x = g[i].x;
            xq->blocks = (int64_t)g[i].M * W->cols / QBLOCK;
            qj.total += xq->blocks;
        }
        g[i].xq = &s->xq[qj.n - 1];
    }
    if (qj.total) pool_run(s->pool, quantize_job, &qj);
    MatmulJob job = {g, n, work, tokens == 1, 8 * s->pool->n, 0, s->pool};
    if (job.decode) pool_share(s->pool, work);
    pool_run(s->pool, matmul_job, &job);
}

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

// Scaled dot-product attention for a share of the kv heads, for every query
// of the chunk. Query head h reads kv head h / (n_heads / n_kv_heads): grouped-
// query attention (repeat_kv). A worker takes whole kv heads and runs all their
// query heads together, key by key and value by value, so that each key and
// value is read from memory once per query, not once per query head.
// Keys before the chunk come from the KV cache, the chunk's own from s->k, s->v.
static void attention_job(void *arg, int tid, int nthreads) {
    AttentionJob *j = arg;
    const Config *p = j->p;
    State *s = j->s;
    int hd = p->head_dim, Q = p->n_heads * hd, group = p->n_heads / p->n_kv_heads, S = s->n_slots;
    float scale = 1.0f / sqrtf((float)hd);
    int g0, g1;
    split_range(p->n_kv_heads, tid, nthreads, &g0, &g1);
    for (int kvh = g0; kvh < g1; kvh++) {
        int h0 = kvh * group; // its query heads: h0 .. h0 + group - 1
        for (int i = 0; i < j->n; i++) {
            int pos = j->pos0 + i;
            // keys in view: the last W positions with a window, else all of 0..pos
            int first = p->sliding_window > 0 && pos - p->sliding_window + 1 > 0 ? pos - p->sliding_window + 1 : 0;
            const float *q = s->q + (size_t)i * Q + (size_t)h0 * hd;
            float *att = s->att + (size_t)h0 * S, *out = s->att_out + (size_t)i * Q + (size_t)h0 * hd;
            for (int t = first, slot = first % S; t <= pos; t++, slot = slot + 1 == S ? 0 : slot + 1) {
                const float *k = kv_at(j, j->kc, s->k, kvh, t, slot);
                for (int r = 0; r < group; r++) att[(size_t)r * S + t - first] = dot_f32(q + r * hd, k, hd) * scale;
            }
            for (int r = 0; r < group; r++) softmax(att + (size_t)r * S, pos - first + 1);
            memset(out, 0, (size_t)group * hd * sizeof(float));
            for (int t = first, slot = first % S; t <= pos; t++, slot = slot + 1 == S ? 0 : slot + 1) {
                const float *v = kv_at(j, j->vc, s->v, kvh, t, slot);
                for (int r = 0; r < group; r++) {
                    float a = att[(size_t)r * S + t - first], *o = out + r * hd;
                    for (int d = 0; d < hd; d++) o[d] += a * v[d];
                }
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
    Gemm qkv[3] = {{s->q, s->xb, &L->wq, n, NULL}, {s->k, s->xb, &L->wk, n, NULL}, {s->v, s->xb, &L->wv, n, NULL}};
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

// The mixture of experts of one layer for the chunk; adds its output to x.
// Step 4, the expert loop, runs each chosen expert once over all the tokens
// that chose it: out = sum_k weight_k * w2(silu(w1 xb) * w3 xb).
// The experts the next layer's router would pick for the chunk's tokens from
// their residual stream as it is now (before this layer's experts add to it):
// what the expert cache reads ahead. Returns how many, into es (E,).
static int guess_experts(const Config *p, const Layer *next, State *s, int n, int *es) {
    int D = p->dim, E = p->n_experts, pick[p->top_k], want[E], k = 0;
    float logits[E], probs[E], w[p->top_k];
    memset(want, 0, sizeof(want));
    float *xn = s->xb2; // free here: the attention output is in x already
    for (int i = 0; i < n; i++) {
        rmsnorm(xn, s->x + (size_t)i * D, next->ffn_norm, D, p->rms_norm_eps);
        for (int e = 0; e < E; e++) logits[e] = dot_f32(next->gate + (size_t)e * D, xn, D);
        route(logits, E, p->top_k, probs, pick, w);
        for (int j = 0; j < p->top_k; j++) want[pick[j]] = 1;
    }
    for (int e = 0; e < E; e++) if (want[e]) es[k++] = e;
    return k;
}

static void moe(const Config *p, const Layer *L, const Layer *next, State *s, int l, int n) {
    int D = p->dim, H = p->hidden_dim, E = p->n_experts, top_k = p->top_k, NL = p->n_layers;
    s->bytes_read += (uint64_t)n * E * D * sizeof(float); // the router
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
        // what --expert-stats reports: the router's entropy and each expert's count
        for (int e = 0; e < E; e++)
            if (s->router[e] > 0) s->router_entropy[l] -= s->router[e] * log2(s->router[e]);
        for (int k = 0; k < top_k; k++) {
            s->expert_count[(size_t)l * E + chosen[k]]++;
            count[chosen[k]]++;
        }
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
    if (s->cache && next) n_guess = guess_experts(p, next, s, n, guess);
    Expert cached[E];
    for (int a = 0; a < n_used;) {
        int k = s->cache ? cache_acquire(s->cache, L, l, used + a, n_used - a, cached, guess, n_guess) : n_used - a;
        n_guess = 0; // read ahead once
        Gemm up[2 * E], down[E];
        for (int i = 0; i < k; i++) {
            int e = used[a + i];
            const Expert *ex = s->cache ? &cached[i] : &L->experts[e];
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
        if (s->cache) cache_release(s->cache, l, used + a, k);
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
static float *forward_chunk(Model *m, State *s, const int *ids, int n, int pos0, int all_logits) {
    const Config *p = &m->config;
    int D = p->dim;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= p->vocab_size)
            die("token id %d is outside the vocabulary 0..%d", ids[i], p->vocab_size - 1);
        const Matrix *embed = &m->weights.embed; // embed_tokens: one row of (V, D)
        if (m->cache) cache_embed_row(m->cache, embed, ids[i], s->x + (size_t)i * D);
        else dequant_row(embed->type, embed->data, D, ids[i], s->x + (size_t)i * D);
    }
    if (pos0 < 0 || pos0 > s->max_pos - n)
        die("position %d is past the context of %d tokens; use a larger -c", pos0 + n - 1, s->max_pos);
    for (int l = 0; l < p->n_layers; l++) {
        attention(p, &m->weights.layers[l], s, l, pos0, n);
        moe(p, &m->weights.layers[l], l + 1 < p->n_layers ? &m->weights.layers[l + 1] : NULL, s, l, n);
    }
    s->tokens_routed += n;
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
// 5. sampler
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
    ProbId *order;        // (V,) scratch for the filters
} Sampler;

static void sampler_init(Sampler *sm, int vocab_size) {
    if (sm->repeat_last_n > 0) sm->recent = xcalloc(sm->repeat_last_n, sizeof(int));
    sm->mark = xcalloc(vocab_size, sizeof(uint32_t));
    sm->order = xcalloc(vocab_size, sizeof(ProbId));
    if (!sm->rng) sm->rng = 0x9E3779B97F4A7C15ULL; // xorshift's state must not be 0
}

static void sampler_free(Sampler *sm) { free(sm->recent); free(sm->mark); free(sm->order); }

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

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static int compare_prob_desc(const void *a, const void *b) {
    const ProbId *x = a, *y = b;
    return x->prob > y->prob ? -1 : x->prob < y->prob ? 1 : x->id - y->id;
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
    if (sm->temperature == 0.0f) return argmax(logits, n);
    for (int i = 0; i < n; i++) logits[i] /= sm->temperature;
    softmax(logits, n); // now probabilities
    float best = logits[argmax(logits, n)];
    // min-p's floor; and when top-p is the only other filter, a second floor:
    // a token below (1-top_p)/(n-1) of the mass can never be in the nucleus,
    // which keeps the sort short.
    float floor = sm->min_p * best;
    int filtering_top_p = sm->top_p > 0.0f && sm->top_p < 1.0f;
    double mass = -1; // of what min-p and top-k keep, once known
    if (filtering_top_p && sm->top_k <= 0 && n > 1) {
        int kept = 0;
        mass = 0;
        for (int i = 0; i < n; i++) if (logits[i] >= floor) { mass += logits[i]; kept++; }
        float nucleus_floor = kept > 1 ? (float)((1.0 - sm->top_p) * mass / (kept - 1)) : 0.0f;
        if (nucleus_floor > floor) floor = nucleus_floor;
    }
    int m = 0;
    for (int i = 0; i < n; i++) if (logits[i] >= floor) sm->order[m++] = (ProbId){logits[i], i};
    if (m == 0) return argmax(logits, n); // NaN probabilities: nothing compares
    if (sm->top_k > 0 || filtering_top_p) qsort(sm->order, m, sizeof(ProbId), compare_prob_desc);
    if (sm->top_k > 0 && m > sm->top_k) m = sm->top_k;
    if (mass < 0) { mass = 0; for (int i = 0; i < m; i++) mass += sm->order[i].prob; }
    if (filtering_top_p) { // the smallest prefix whose mass exceeds top_p of what is left
        double cut = sm->top_p * mass, acc = 0;
        for (int i = 0; i < m; i++) {
            acc += sm->order[i].prob;
            if (acc > cut) { m = i + 1; mass = acc; break; }
        }
    }
    double r = random_f32(&sm->rng) * mass, cdf = 0;
    for (int i = 0; i < m; i++) { cdf += sm->order[i].prob; if (r < cdf) return sm->order[i].id; }
    return sm->order[m - 1].id;
}

// ----------------------------------------------------------------------------
// 6. generation and chat

// What a run was asked for on the command line.
typedef struct {
    int steps;          // most tokens to generate per reply
    const char **stop;  // --stop: strings that end a reply (not printed)
    int n_stop;
    int stats, trace;   // --expert-stats, --trace-experts
    int quiet;          // --quiet: stdout's text only, nothing on stderr but errors
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

// Runs ids through the model from position *pos on, in chunks; the logits of
// the last one are left in s->logits. Shows progress on a terminal when asked.
// Returns how many went in: fewer than n when Ctrl-C stopped it between chunks.
static int feed(Model *m, State *s, Sampler *sm, const int *ids, int n, int *pos, int progress) {
    double t0 = time_s();
    int i = 0;
    while (i < n && !interrupted) {
        int c = n - i < s->chunk ? n - i : s->chunk;
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
static void echo_ids(TokenDecoder *d, const Tokenizer *t, const int *ids, int n) {
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
        if (*pos >= s->max_pos) { r.context_full = 1; break; }
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
    int E = p->n_experts, top_k = p->top_k;
    const char *shades = " .:-=+*#%@"; // share of choices relative to an even share 1/E: 0 .. 2x and over
    uint64_t n = s->tokens_routed;
    printf("\nexpert usage over %llu tokens (top-%d of %d experts; heat: ' ' none, '=' an even share, '%%' twice that)\n",
           (unsigned long long)n, top_k, E);
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
    if (s->cache) cache_report(s->cache, stdout);
}

static void clear_expert_stats(const Config *p, State *s) {
    memset(s->expert_count, 0, (size_t)p->n_layers * p->n_experts * sizeof(uint64_t));
    memset(s->router_entropy, 0, (size_t)p->n_layers * sizeof(double));
    s->tokens_routed = 0;
}

// --trace-experts: for each generated token, the experts that processed it in
// every layer, as "a+b .62": the chosen experts, best first, and the weight of
// the best. Layers go in blocks of TRACE_LAYERS columns, each under its header.
#define TRACE_LAYERS 8

static void print_trace(const Model *m, const Trace *tr) {
    const Config *p = &m->config;
    int top_k = p->top_k, L = p->n_layers;
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

// Continues a prompt. Returns the exit status: 0, or 130 after Ctrl-C.
static int generate(Model *m, State *s, Sampler *sm, const char *prompt, size_t prompt_len, const RunOptions *opt) {
    const Config *p = &m->config;
    IdList prompt_ids = {0};
    ids_push(&prompt_ids, p->bos_id);
    ids_push_text(&prompt_ids, &m->tokenizer, prompt, prompt_len);
    int n = prompt_ids.n;
    if (n > s->max_pos)
        die("the prompt is %d tokens (BOS included) but the context holds %d; use -c %d or more", n, s->max_pos, n + 1);

    // echo the prompt, then continue it with the same decoder: one stream of text
    TokenDecoder dec;
    decoder_init(&dec);
    echo_ids(&dec, &m->tokenizer, prompt_ids.ids + 1, n - 1);

    double t0 = time_s();
    int pos = 0;
    int fed = feed(m, s, sm, prompt_ids.ids, n, &pos, !opt->quiet && stderr_is_tty() && n > s->chunk);
    double t_prompt = time_s() - t0;
    Trace tr = {0};
    Reply r = {0};
    if (fed == n) r = reply(m, s, sm, opt, &pos, &dec, opt->trace ? &tr : NULL);
    printf("\n");
    print_routing(m, s, opt, &tr);
    trace_free(&tr);
    if (r.context_full)
        fprintf(stderr, "mixtral: stopped: the context of %d tokens is full (use a larger -c)\n", s->max_pos);
    if (interrupted && !opt->quiet) fprintf(stderr, "mixtral: interrupted\n");
    if (!opt->quiet) print_summary(fed, t_prompt, r.tokens, r.seconds);
    if (!opt->quiet && s->cache) cache_report(s->cache, stderr);
    free(prompt_ids.ids);
    return interrupted ? 130 : 0;
}

// --- chat --------------------------------------------------------------------
// Mistral's instruct format and the conversation-file reader are in chat.c.

// Reads and formats a conversation file into ids (BOS first), or dies saying why.
static void read_conversation(const Model *m, const char *path, IdList *ids, Conversation *conv) {
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
                    "or restart with a larger -c]\n", s->max_pos);
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
                s->max_pos);
}

// Interactive chat. The KV cache persists between turns, so each turn runs only
// its new tokens through the model. Ctrl-C stops a reply; at the prompt it
// leaves, as end of input and /quit do.
static void chat(Model *m, State *s, Sampler *sm, const char *system, const char *conv_path, const RunOptions *opt) {
    const Config *p = &m->config;
    IdList turn = {0};
    ChatTotals tot = {0};
    int pos = 0, replied = 0; // replied: an assistant reply whose EOS is not yet in the cache
    if (conv_path) { // pick up a saved conversation
        Conversation conv;
        read_conversation(m, conv_path, &turn, &conv);
        int last = -1, last_msg = -1;
        for (int i = 0; i < conv.n; i++) if (conv.msgs[i].role != ROLE_SYSTEM) { last = conv.msgs[i].role; last_msg = i; }
        if (last < 0) die("%s has no user or assistant message: nothing to reply to", conv_path);
        if (turn.n > s->max_pos) die("%s is %d tokens but the context holds %d; use a larger -c", conv_path, turn.n, s->max_pos);
        TokenDecoder dec;
        decoder_init(&dec);
        printf("Assistant: ");
        if (last == ROLE_ASSISTANT) { // continue the final message: its text, then more of it
            IdList tail = {0};
            ids_push_text(&tail, &m->tokenizer, conv.msgs[last_msg].content, conv.msgs[last_msg].len);
            echo_ids(&dec, &m->tokenizer, turn.ids + turn.n - tail.n, tail.n);
            free(tail.ids);
        }
        chat_free(&conv);
        double t0 = time_s();
        if (feed(m, s, sm, turn.ids, turn.n, &pos, !opt->quiet && stderr_is_tty() && turn.n > s->chunk) < turn.n)
            die("interrupted while reading %s", conv_path);
        tot.in_tokens += turn.n;
        tot.in_s += time_s() - t0;
        chat_reply(m, s, sm, opt, &pos, &dec, &tot);
        replied = 1;
        system = NULL; // it belonged to the file's first user message
    }
    for (;;) {
        printf("User: ");
        fflush(stdout);
        size_t len;
        char *line = read_line(&len);
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
        if (pos + turn.n >= s->max_pos) { print_context_full(s); continue; }
        if (opt->stats) clear_expert_stats(p, s); // the statistics of this turn
        double t0 = time_s();
        int fed = feed(m, s, sm, turn.ids, turn.n, &pos, !opt->quiet && stderr_is_tty() && turn.n > s->chunk);
        double t_in = time_s() - t0;
        if (fed < turn.n) { // Ctrl-C before the reply began: the turn never happened
            pos = start;
            interrupted = 0;
            printf("\n");
            continue;
        }
        tot.in_tokens += turn.n;
        tot.in_s += t_in;
        // only this turn's tokens went through the model: the cache holds the rest
        if (!opt->quiet) fprintf(stderr, "[%d new tokens in, %.2f tok/s]\n", turn.n, per_second(turn.n, t_in));
        printf("Assistant: ");
        TokenDecoder dec;
        decoder_init(&dec);
        chat_reply(m, s, sm, opt, &pos, &dec, &tot);
        replied = 1;
    }
    if (!opt->quiet) print_summary(tot.in_tokens, tot.in_s, tot.out_tokens, tot.out_s);
    if (!opt->quiet && s->cache) cache_report(s->cache, stderr);
    free(turn.ids);
}

// --bench: a 128-token prompt of fixed pseudo-random ids, then 64 greedy
// tokens (EOS does not stop it). Decode speed is reported with the bytes of
// weights and cache it read, and the closing JSON line is for scripts. With
// --bench-depth also a 512-token prompt, and decoding (32 tokens) after 1024
// and after 4096 tokens of context, as far as -c allows.
static double bench_decode(Model *m, State *s, int n, int *pos) {
    double t0 = time_s();
    for (int i = 0; i < n; i++) forward(m, s, argmax(s->logits, m->config.vocab_size), (*pos)++);
    return n / (time_s() - t0);
}

static double bench_prompt(Model *m, State *s, int n, int *pos) {
    int *ids = xcalloc(n, sizeof(int));
    uint64_t rng = 0x2545F4914F6CDD1DULL;
    ids[0] = m->config.bos_id;
    for (int i = 1; i < n; i++) ids[i] = (int)(random_u32(&rng) % (uint32_t)m->config.vocab_size);
    double t0 = time_s();
    feed(m, s, NULL, ids, n, pos, 0);
    double rate = n / (time_s() - t0);
    free(ids);
    return rate;
}

static void bench(Model *m, State *s, int threads, int depth) {
    const Config *p = &m->config;
    enum { PROMPT = 128, DECODE = 64, DEPTH_DECODE = 32 };
    if (s->max_pos < PROMPT + DECODE) die("--bench needs a context of at least %d tokens (-c)", PROMPT + DECODE);
    // Warm-up, as llama-bench has one: touch every page of the file once, so
    // that the timings measure the engine rather than the kernel mapping the
    // weights into this process on their first use.
    if (!m->cache) // (with the expert cache, the mapping is not read)
        for (uint64_t at = 0; at < m->map_size; at += 4096) (void)((const volatile uint8_t *)m->map)[at];
    int pos = 0;
    double prefill = bench_prompt(m, s, PROMPT, &pos);
    if (m->cache) cache_settle(m->cache);
    uint64_t bytes0 = s->bytes_read, cache0 = m->cache ? m->cache->bytes_read : 0, io0 = storage_read_bytes();
    double decode = bench_decode(m, s, DECODE, &pos);
    if (m->cache) cache_settle(m->cache);
    double io_per_token = (double)(storage_read_bytes() - io0) / DECODE; // from the disk, however the weights came
    double cache_per_token = m->cache ? (double)(m->cache->bytes_read - cache0) / DECODE : 0;
    double bytes = (double)(s->bytes_read - bytes0) / DECODE;
    fprintf(stderr, "%s weights, %s kernels, %d threads: prefill %.2f tok/s, decode %.2f tok/s, "
                    "%.1f MB read per token, %.2f GB/s\n", weight_type_name[p->weight_type], kernels_simd_name, threads,
            prefill, decode, bytes / 1e6, bytes * decode / 1e9);
    char extra[512] = "";
    if (depth) {
        int o = 0;
        if (s->max_pos >= 512) {
            pos = 0;
            double pp512 = bench_prompt(m, s, 512, &pos);
            fprintf(stderr, "512-token prompt: %.2f tok/s\n", pp512);
            o += snprintf(extra + o, sizeof(extra) - o, ", \"pp512_tok_s\": %.3f", pp512);
        }
        static const int depths[] = {1024, 4096};
        for (int i = 0; i < 2; i++) {
            if (s->max_pos < depths[i] + DEPTH_DECODE) {
                fprintf(stderr, "decoding after %d tokens: skipped, -c %d is too short\n", depths[i], s->max_pos);
                continue;
            }
            pos = 0;
            bench_prompt(m, s, depths[i], &pos);
            double d = bench_decode(m, s, DEPTH_DECODE, &pos);
            fprintf(stderr, "decoding after %d tokens: %.2f tok/s\n", depths[i], d);
            o += snprintf(extra + o, sizeof(extra) - o, ", \"decode_at_%d_tok_s\": %.3f", depths[i], d);
        }
    }
    if (m->cache) {
        ExpertCache *c = m->cache;
        cache_report(c, stderr);
        uint64_t lookups = c->hits + c->misses;
        int o = (int)strlen(extra);
        snprintf(extra + o, sizeof(extra) - o, ", \"cache_hit_rate\": %.4f, \"prefetch_accuracy\": %.4f, \"read_mb\": %.1f, "
                 "\"read_mb_s\": %.1f, \"decode_read_mb_per_token\": %.2f, \"cache_slots\": %d, "
                 "\"cache_budget_mb\": %.0f, \"cache_slot_mb\": %.1f",
                 lookups ? (double)c->hits / lookups : 0.0,
                 c->prefetched ? (double)c->prefetch_used / c->prefetched : 0.0, c->bytes_read / 1e6,
                 c->busy_seconds > 0 ? c->bytes_read / 1e6 / c->busy_seconds : 0.0, cache_per_token / 1e6, c->n_slots,
                 c->budget / 1e6, c->slot_bytes / 1e6);
    }
    int o = (int)strlen(extra);
    snprintf(extra + o, sizeof(extra) - o, ", \"peak_rss_mb\": %.0f, \"disk_read_mb_per_token\": %.2f",
             peak_resident_mb(), io_per_token / 1e6);
    printf("{\"prefill_tok_s\": %.3f, \"decode_tok_s\": %.3f, \"threads\": %d, \"bytes_per_token\": %.0f, "
           "\"gb_per_s\": %.3f, \"weight_type\": \"%s\", \"kernels\": \"%s\"%s}\n",
           prefill, decode, threads, bytes, bytes * decode / 1e9, weight_type_name[p->weight_type], kernels_simd_name,
           extra);
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
    TokenDecoder dec;
    decoder_init(&dec);
    echo_ids(&dec, t, ids.ids, ids.n);
    char *buf = xcalloc(decoder_max_bytes(t), 1);
    fwrite(buf, 1, decoder_flush(&dec, buf), stdout);
    printf("\n");
    free(buf);
    free(ids.ids);
}

// --- output files -------------------------------------------------------------
//
// Every file the program writes is written under a temporary name and renamed
// when complete, and never onto one of its inputs (the model above all: a
// truncated model file would also crash the run that maps it).

typedef struct { FILE *f; char *path, *tmp; } Output;

// Dies if path is one of the inputs (the same file, whatever its name).
static void output_check(const char *path, const char *const *inputs, int n_inputs) {
    struct stat out_st;
    if (stat(path, &out_st) == 0)
        for (int i = 0; i < n_inputs; i++) {
            struct stat in_st;
            if (inputs[i] && stat(inputs[i], &in_st) == 0 && in_st.st_dev == out_st.st_dev && in_st.st_ino == out_st.st_ino)
                die("refusing to write %s: it is the input file %s", path, inputs[i]);
        }
}

static Output output_open(const char *path, const char *const *inputs, int n_inputs) {
    output_check(path, inputs, n_inputs);
    Output o = {NULL, strdup(path), xcalloc(strlen(path) + 16, 1)};
    sprintf(o.tmp, "%s.partial", path);
    if (!o.path || !(o.f = fopen(o.tmp, "wb"))) die("cannot write %s: %s", o.tmp, strerror(errno));
    return o;
}

static void output_write(Output *o, const void *data, size_t size, size_t n) {
    if (fwrite(data, size, n, o->f) != n) die("cannot write %s: %s", o->tmp, strerror(errno));
}

static void output_close(Output *o) {
    if (fclose(o->f) != 0) die("cannot write %s: %s", o->tmp, strerror(errno));
    if (rename(o->tmp, o->path) != 0) die("cannot rename %s to %s: %s", o->tmp, o->path, strerror(errno));
    free(o->path);
    free(o->tmp);
}

// --- measuring a weight format: perplexity and KL divergence ------------------
//
// --perplexity FILE: the text's tokens (BOS first) in windows of -c tokens, the
// first of each replaced by BOS, each a fresh sequence; the positions of the
// second half of a window predict the next token and are scored (as llama.cpp's
// perplexity tool does, so the two can be compared). Perplexity = exp(mean
// negative log-likelihood), with the standard error of that mean through exp. --kl-base OUT saves the log-probabilities of
// every scored position (with the text's ids); --kl-divergence BASE compares
// this model's with them: KL(base || this) per position, and how often the
// most likely token is the same.

#define KL_MAGIC "MXKLBASE"

typedef struct { char magic[8]; uint32_t vocab, window, n_ids, positions; } KlHeader;

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void quality(Model *m, State *s, const char *model_path, const char *text_path, const char *base_out,
                    const char *base_in) {
    const Config *p = &m->config;
    int V = p->vocab_size, W = s->max_pos < INT_MAX ? s->max_pos : 4096;
    size_t len;
    char *text = read_file(text_path, &len);
    IdList all = {0};
    ids_push(&all, p->bos_id);
    ids_push_text(&all, &m->tokenizer, text, len);
    free(text);
    int *ids = all.ids, n_ids = all.n;
    if (W < 4) die("--perplexity needs windows of at least 4 tokens (-c)");
    int first = W / 2, windows = n_ids / W, per_window = W - 1 - first, positions = windows * per_window;
    if (windows == 0) die("%s is %d tokens, less than one window of -c %d", text_path, n_ids, W);
    FILE *bf = NULL;
    Output out = {0};
    KlHeader h = {KL_MAGIC, (uint32_t)V, (uint32_t)W, (uint32_t)n_ids, (uint32_t)positions};
    if (base_in) {
        if (!(bf = fopen(base_in, "rb"))) die("cannot open %s: %s", base_in, strerror(errno));
        KlHeader b;
        if (fread(&b, sizeof(b), 1, bf) != 1 || memcmp(b.magic, KL_MAGIC, 8))
            die("%s is not a --kl-base file of mixtral.c", base_in);
        if (b.vocab != h.vocab || b.window != h.window || b.n_ids != h.n_ids || b.positions != h.positions)
            die("%s was made with another vocabulary, text or -c (vocab %u, -c %u, %u ids; here %u, %u, %u)", base_in,
                b.vocab, b.window, b.n_ids, h.vocab, h.window, h.n_ids);
        int *bids = xcalloc(n_ids, sizeof(int));
        if (fread(bids, sizeof(int), n_ids, bf) != (size_t)n_ids || memcmp(bids, ids, n_ids * sizeof(int)))
            die("%s was made from another text than %s", base_in, text_path);
        free(bids);
    }
    if (base_out) {
        const char *inputs[] = {model_path, text_path, base_in};
        out = output_open(base_out, inputs, 3);
        output_write(&out, &h, sizeof(h), 1);
        output_write(&out, ids, sizeof(int), n_ids);
    }
    float *lp = xcalloc(V, sizeof(float)), *blp = xcalloc(V, sizeof(float));
    double *kl = xcalloc(positions, sizeof(double)), nll = 0, nll2 = 0;
    int *win = xcalloc(W, sizeof(int)), scored = 0, same_top = 0;
    double t0 = time_s();
    for (int w = 0; w < windows; w++) {
        memcpy(win, ids + (size_t)w * W, W * sizeof(int));
        win[0] = p->bos_id;
        for (int pos = 0; pos < W - 1; pos += s->chunk) {
            int c = W - 1 - pos < s->chunk ? W - 1 - pos : s->chunk;
            const float *logits = forward_chunk(m, s, win + pos, c, pos, 1);
            for (int i = 0; i < c; i++) {
                if (pos + i < first) continue; // the first half: context only
                const float *z = logits + (size_t)i * V;
                double max = z[0], sum = 0;
                for (int v = 1; v < V; v++) max = z[v] > max ? z[v] : max;
                for (int v = 0; v < V; v++) sum += exp(z[v] - max);
                double lse = max + log(sum);
                for (int v = 0; v < V; v++) lp[v] = (float)(z[v] - lse);
                double l = -lp[win[pos + i + 1]];
                nll += l;
                nll2 += l * l;
                if (base_out) output_write(&out, lp, sizeof(float), V);
                if (bf) {
                    if (fread(blp, sizeof(float), V, bf) != (size_t)V) die("%s is truncated", base_in);
                    double d = 0;
                    for (int v = 0; v < V; v++) d += exp((double)blp[v]) * ((double)blp[v] - lp[v]);
                    kl[scored] = d > 0 ? d : 0;
                    same_top += argmax(blp, V) == argmax(lp, V);
                }
                scored++;
            }
        }
        if (stderr_is_tty()) fprintf(stderr, "\r[%d/%d windows]", w + 1, windows);
    }
    if (stderr_is_tty()) fprintf(stderr, "\n");
    double mean = nll / positions, var = nll2 / positions - mean * mean;
    double se = positions > 1 && var > 0 ? sqrt(var / (positions - 1)) : 0;
    printf("perplexity %.4f +/- %.4f over %d positions (the second halves of %d windows of -c %d; %s weights; %.1f s)\n",
           exp(mean), exp(mean) * se, positions, windows, W, weight_type_name[p->weight_type], time_s() - t0);
    if (bf) {
        double total = 0;
        for (int i = 0; i < positions; i++) total += kl[i];
        qsort(kl, positions, sizeof(double), compare_double);
        printf("KL divergence from %s: mean %.6f, median %.6f, 90%% %.6f, 99%% %.6f, max %.6f; "
               "top-1 agreement %.4f\n", base_in, total / positions, kl[positions / 2], kl[positions * 9 / 10],
               kl[positions * 99 / 100], kl[positions - 1], (double)same_top / positions);
        printf("{\"perplexity\": %.6f, \"kl_mean\": %.8f, \"kl_median\": %.8f, \"kl_p99\": %.8f, \"top1\": %.6f, "
               "\"positions\": %d}\n", exp(mean), total / positions, kl[positions / 2], kl[positions * 99 / 100],
               (double)same_top / positions, positions);
        fclose(bf);
    }
    if (base_out) output_close(&out);
    free(lp);
    free(blp);
    free(kl);
    free(win);
    free(all.ids);
}

// The test hook: logits after every input position, raw little-endian f32 (n, V);
// optionally the chosen experts, int32 (n, n_layers, top_k).
static void dump_logits(Model *m, State *s, const char *model_path, const int *ids, int n,
                        const char *logits_path, const char *experts_path) {
    const Config *p = &m->config;
    if (n > s->max_pos) die("%d ids but the context holds %d; use a larger -c", n, s->max_pos);
    if (experts_path && !strcmp(experts_path, logits_path)) die("--dump-logits and --dump-experts name the same file");
    if (experts_path) output_check(experts_path, &model_path, 1); // before anything is written
    Output f = output_open(logits_path, &model_path, 1), fe = {0};
    if (experts_path) fe = output_open(experts_path, &model_path, 1);
    for (int pos = 0; pos < n; pos += s->chunk) {
        int c = n - pos < s->chunk ? n - pos : s->chunk;
        float *logits = forward_chunk(m, s, ids + pos, c, pos, 1);
        output_write(&f, logits, sizeof(float), (size_t)c * p->vocab_size);
        if (experts_path) output_write(&fe, s->chosen, sizeof(int), (size_t)c * p->n_layers * p->top_k);
    }
    output_close(&f);
    if (experts_path) output_close(&fe);
}

// ----------------------------------------------------------------------------
// 7. command line

#define PROGRAM_VERSION "0.5"

static void print_usage(FILE *out) {
    fprintf(out,
        "usage: mixtral MODEL.bin [options]   (mixtral -h: this help; mixtral --version)\n"
        "  -i, --prompt TEXT     prompt (default: empty, generation starts from BOS)\n"
        "  -f, --file F          prompt from file F (- for standard input), one final newline dropped\n"
        "  -n, --steps N         most tokens to generate (per reply in chat; default 256)\n"
        "  -c, --context N       KV-cache length in tokens (default min(4096, model max))\n"
        "  -m, --mode MODE       generate or chat (default generate)\n"
        "  -y, --system TEXT     chat: system prompt, placed before the first user message\n"
        "      --chat-file F     chat: continue the conversation in F, a JSON object\n"
        "                        {\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}]}\n"
        "                        (a final assistant message is continued, not closed)\n"
        "sampling, applied in this order:\n"
        "      --repeat-penalty R  recent tokens' logits divided by R (multiplied if negative); 1 = off (default)\n"
        "      --repeat-last-n N   tokens that count as recent, prompt included (default 64)\n"
        "  -t, --temp T          temperature, 0 = greedy and nothing below applies (default 1.0)\n"
        "      --top-k K         keep the K most likely tokens, 0 = off (default)\n"
        "      --min-p P         keep tokens at least P times as likely as the best, 0 = off (default)\n"
        "  -p, --top-p P         keep the fewest most likely tokens holding P of the mass, 1 = off (default 0.9)\n"
        "  -s, --seed N          random seed (default: from the clock, printed to stderr)\n"
        "      --stop STR        end the reply where STR appears, not printing it (repeatable)\n"
        "output and speed:\n"
        "  -q, --quiet           print only the generated text (errors still go to stderr)\n"
        "      --threads N       threads (default: the CPUs this process may run on)\n"
        "      --mem SIZE        memory for the weights and working buffers, the KV cache aside (e.g. 12G):\n"
        "                        a larger model keeps its experts in a cache that fits, read from the\n"
        "                        file as needed (default: the memory available, when the model is larger)\n"
        "      --cache-policy P  which expert the cache drops: lru (least recently used, default) or usage\n"
        "                        (least often used lately)\n"
        "      --mmap            map the model file instead of reading it into memory: starts at once,\n"
        "                        shares the page cache, runs slower (default: read it in if it fits)\n"
        "      --no-mmap         read the model into memory even if it looks too big to fit\n"
        "      --chunk N         prompt tokens processed together, each expert once per chunk (default 128)\n"
        "      --info            print the model's configuration and exit\n"
        "      --expert-stats    after each reply, print per-layer expert usage and routing entropy\n"
        "      --trace-experts   after each reply, print each token's experts and weights per layer\n"
        "      --bench           time a 128-token prompt and 64 generated tokens; ends with a JSON line\n"
        "      --bench-depth     --bench, then a 512-token prompt and decoding after 1024 and 4096 tokens\n"
        "      --perplexity F    perplexity over text file F, in windows of -c tokens, each from BOS\n"
        "      --kl-base OUT     with --perplexity: save every position's log-probabilities to OUT\n"
        "      --kl-divergence B with --perplexity: KL divergence from, and top-1 agreement with, base file B\n"
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
    const char *ppl_path, *kl_out, *kl_in;
    const char *mode, *system, *chat_path, *chat_ids_path;
    int context, threads, info, do_bench, bench_depth, chunk, seeded, load, chatting, cache_by_usage;
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
    o->load = LOAD_AUTO;
    o->run.steps = 256;
    o->sampler = (Sampler){.temperature = 1.0f, .top_p = 0.9f, .repeat_penalty = 1.0f, .repeat_last_n = 64};
    o->seed = (uint64_t)time(NULL);
    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) { print_usage(stdout); return 1; }
    if (argc >= 2 && !strcmp(argv[1], "--version")) {
        printf("mixtral.c %s, model file format %d, kernels %s\n", PROGRAM_VERSION, MODEL_VERSION, kernels_simd_name);
        return 1;
    }
    if (argc < 2 || argv[1][0] == '-') { print_usage(stderr); die("the first argument must be a model file"); }
    o->model_path = argv[1];
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
        if (!strcmp(a, "--mmap")) { o->load = LOAD_MMAP; continue; }
        if (!strcmp(a, "--no-mmap")) { o->load = LOAD_READ; continue; }
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
            o->cache_by_usage = !strcmp(v, "usage");
        }
        else if (!strcmp(a, "--chunk")) o->chunk = (int)parse_int(a, v, 1, 4096);
        else if (!strcmp(a, "--ids")) o->ids_arg = v;
        else if (!strcmp(a, "--dump-logits")) o->logits_path = v;
        else if (!strcmp(a, "--dump-experts")) o->experts_path = v;
        else if (!strcmp(a, "--perplexity")) o->ppl_path = v;
        else if (!strcmp(a, "--kl-base")) o->kl_out = v;
        else if (!strcmp(a, "--kl-divergence")) o->kl_in = v;
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
    if ((o->kl_out || o->kl_in) && !o->ppl_path) die("--kl-base and --kl-divergence need --perplexity FILE (the text)");
    return 0;
}

#ifndef MIXTRAL_NO_MAIN
int main(int argc, char **argv) {
    Options o;
    if (parse_options(argc, argv, &o)) return 0;
    double t_load = time_s();
    Model model;
    // what only looks at the header or the tokenizer maps the file; runs read it in when it fits
    int quick = o.info || o.chat_ids_path || o.tokenize_path || o.detokenize_ids;
    if (o.threads == 0) o.threads = pool_usable_cpus();
    ThreadPool pool; // reads the model in, then runs it
    if (pool_init(&pool, o.threads) != 0) die("cannot start %d threads (try fewer with --threads)", o.threads);
    model_load(&model, o.model_path, quick ? LOAD_MMAP : o.load, &pool, quick ? 0 : o.mem, o.context, o.chunk);
    if (model.cache) model.cache->by_usage = o.cache_by_usage;
    t_load = time_s() - t_load;
    const Config *p = &model.config;
    if (o.info) {
        printf("weights %s, dim %d, hidden_dim %d, layers %d, heads %d, kv heads %d, head_dim %d,\n"
               "experts %d, top_k %d, vocab %d, max positions %d, sliding window %d, rope_theta %g, eps %g\n",
               weight_type_name[p->weight_type], p->dim, p->hidden_dim, p->n_layers, p->n_heads, p->n_kv_heads,
               p->head_dim, p->n_experts, p->top_k, p->vocab_size, p->max_seq_len, p->sliding_window,
               p->rope_theta, p->rms_norm_eps);
        printf("matrix types:");
        for (int k = 0; k < N_KINDS; k++) printf(" %s %s", kind_name[k], weight_type_name[p->matrix_type[k]]);
        printf("\n");
        model_free(&model);
        pool_free(&pool);
        return 0;
    }
    if (o.chat_ids_path) {
        IdList ids = {0};
        Conversation conv;
        read_conversation(&model, o.chat_ids_path, &ids, &conv);
        for (int i = 0; i < ids.n; i++) printf(i ? " %d" : "%d", ids.ids[i]);
        printf("\n");
        chat_free(&conv);
        free(ids.ids);
        model_free(&model);
        pool_free(&pool);
        return 0;
    }
    if (o.tokenize_path || o.detokenize_ids) {
        if (o.tokenize_path) tokenize_file(&model.tokenizer, o.tokenize_path);
        if (o.detokenize_ids) detokenize(&model.tokenizer, o.detokenize_ids);
        model_free(&model);
        pool_free(&pool);
        return 0;
    }
    if (o.context == 0) o.context = p->max_seq_len < 4096 ? p->max_seq_len : 4096;
    if (o.context > p->max_seq_len)
        fprintf(stderr, "mixtral: warning: -c %d is beyond the %d positions the model was trained for; "
                        "expect worse text past %d\n", o.context, p->max_seq_len, p->max_seq_len);

    // the prompt: -i, -f FILE or -f - (standard input)
    size_t prompt_len = o.prompt ? strlen(o.prompt) : 0;
    char *prompt_text = NULL;
    if (o.prompt_path) {
        o.prompt = prompt_text = read_file(o.prompt_path, &prompt_len);
        if (prompt_len && o.prompt[prompt_len - 1] == '\n') prompt_len--; // the newline that ends a file
    }
    int running = !o.do_bench && !o.ppl_path && !o.ids_arg;
    if (running && !o.run.quiet) {
        double rss = resident_mb();
        fprintf(stderr, "mixtral: loaded %s (%s, %.2f GB, %s) in %.2f s, %.0f MB resident; %d threads, context %d\n",
                o.model_path, weight_type_name[p->weight_type], model.map_size / 1e9,
                model.in_memory ? "read into memory" : "mapped", t_load,
                rss >= 0 ? rss : peak_resident_mb(), o.threads, o.context);
        if (!o.seeded && o.sampler.temperature > 0) fprintf(stderr, "mixtral: seed %llu (-s repeats this run)\n", (unsigned long long)o.seed);
    }

    State state;
    state_init(&state, p, o.context, o.chunk, &pool);
    state.cache = model.cache;

    int status = 0;
    if (o.do_bench) {
        bench(&model, &state, o.threads, o.bench_depth);
    } else if (o.ppl_path) {
        quality(&model, &state, o.model_path, o.ppl_path, o.kl_out, o.kl_in);
    } else if (o.ids_arg) {
        IdList ids = parse_ids("--ids", o.ids_arg, p->vocab_size);
        if (ids.n == 0) die("--ids: no token ids given");
        if (!o.logits_path) die("--ids needs --dump-logits");
        dump_logits(&model, &state, o.model_path, ids.ids, ids.n, o.logits_path, o.experts_path);
        free(ids.ids);
    } else {
        o.sampler.rng = o.seed;
        sampler_init(&o.sampler, p->vocab_size);
        catch_interrupts(1);
        if (o.chatting) chat(&model, &state, &o.sampler, o.system, o.chat_path, &o.run);
        else status = generate(&model, &state, &o.sampler, o.prompt ? o.prompt : "", prompt_len, &o.run);
        sampler_free(&o.sampler);
    }
    free(prompt_text);
    free(o.run.stop);
    state_free(&state, p);
    pool_free(&pool);
    model_free(&model);
    return status;
}
#endif
