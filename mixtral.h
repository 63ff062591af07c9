// mixtral.h: the model's data, as mixtral.c computes with it: the file's header
// (Config), the weights (Matrix, Expert, Layer, Weights, Model) and the state of
// a run (State: activations and the KV cache). The comments give each array's
// shape in the dimension letters of mixtral.c's opening comment. Also what
// mixtral.c offers the evaluation tools (eval.c) and the test drivers.
#ifndef MIXTRAL_H
#define MIXTRAL_H

#include <stddef.h>
#include <stdint.h>

#include "chat.h"
#include "expert_cache.h"
#include "kernels.h"
#include "pool.h"
#include "tokenizer.h"
#include "util.h"

// ----------------------------------------------------------------------------
// The model file (written by export.py; the layout is documented there)
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
// (export.py's RECIPES choose them). How each weight type is stored (q8/q6/q4:
// rows interleaved in groups of 16, an f16 scale per block of 32) is part of the
// kernels' contract, kernels.h.

#define MODEL_MAGIC "MIXTRALC"
#define MODEL_VERSION 4
#define HEADER_SIZE 256
#define WEIGHTS_ALIGN 4096
#define TENSOR_ALIGN 64

// The kinds of matrix, in the order of the header's matrix_type (export.py's MATRIX_KINDS).
enum { KIND_EMBED, KIND_WQ, KIND_WK, KIND_WV, KIND_WO, KIND_W1, KIND_W3, KIND_W2, KIND_LM_HEAD, N_KINDS };
extern const char *const kind_name[N_KINDS];
extern const char *const weight_type_name[WEIGHT_NTYPES]; // "f32", "bf16", "q8", ... by WEIGHT_*
extern const char *const kv_type_name[KV_NTYPES];         // "f32", "bf16", "q8", "q4" by KV_*

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
    int32_t n_experts_per_tok; // num_experts_per_tok: the router's top-k
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
    const void *data;    // f32 or bf16 rows, or q8/q6/q4/q3/q2 groups of 16 interleaved rows
    int type;            // WEIGHT_*
    int rows, cols;
    uint64_t bytes;      // weight_matrix_bytes(type, rows, cols)
    int id;              // its place among the file's matrices (matrix_name: which one)
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
    ExpertCache *expert_cache; // the experts in a cache of slots (model larger than memory), or NULL
    uint8_t *resident;      // with the expert cache: everything but the experts, read in
    size_t resident_alloc;  // (anon_alloc's size)
    uint64_t memory_given;  // with the expert cache: what it was all given (--mem, or by default)
} Model;

// How the model gets into memory: read into the process (LOAD_READ), mapped
// (LOAD_MMAP: instant, shared with the page cache, but 4 KB pages), or read
// when it fits in the memory available (LOAD_AUTO).
typedef enum { LOAD_AUTO, LOAD_MMAP, LOAD_READ } LoadMode;

// ----------------------------------------------------------------------------
// The state of a run

// The input of a batch's products quantized for q8/q6/q4 weights (kernels.h's
// QuantX), or rounded to bf16 for bf16 weights with --bf16-activations, with
// the f32 input it was made from, so that products sharing an input (wq, wk,
// wv; an expert's w1 and w3) quantize it once.
typedef struct {
    QuantX qx;        // (M, K) int8 blocks, their scales and sums
    uint16_t *bf16;   // (M, K) the input rounded to bf16 (--bf16-activations), or NULL
    const float *x;   // (M, K) what was quantized
    int64_t values;   // M * K
    int64_t blocks;   // M * K / QBLOCK, rounded up
    int int8, to_bf16; // which of the two its products need
} QuantInput;

// --imatrix: for every matrix (by Matrix.id), the sum over the tokens of the
// squares of each input column's activation, and how many tokens.
typedef struct {
    int n;             // matrices
    int *cols;         // (n,)
    double **sum;      // (n, cols) or NULL for a matrix never multiplied (the embedding)
    uint64_t *tokens;  // (n,)
} Imatrix;

// What the forward pass counts as it goes, through the count_* hooks of
// mixtral.c, for --bench, --expert-stats and --imatrix. The math never reads it.
typedef struct {
    uint64_t memory_bytes;   // weight and KV-cache bytes the products and attention read
    uint64_t *expert_count;  // (n_layers, E) times each expert was chosen
    double *router_entropy;  // (n_layers,) sum over tokens of the router softmax's entropy, bits
    uint64_t tokens_routed;  // tokens through the routers since the counts were cleared
    Imatrix *imatrix;        // --imatrix, or NULL
} Counters;

// A prompt's positions attend in blocks of ATT_POSITIONS: each key and value
// is read once for the block's queries of the heads that share it.
enum { ATT_POSITIONS = 4 };

typedef struct {
    int chunk;         // C: most tokens run through the model together (1 when decoding)
    int context;       // positions 0..context-1 may be computed (-c)
    int kv_len;        // S: positions the KV cache holds: the context, or the sliding window if shorter
    float *x;          // (C, D) the residual stream
    float *xb;         // (C, D) normed input of a block
    float *xb2;        // (C, D) attention output after wo
    float *q;          // (C, Q)
    float *k, *v;      // (C, KV) the chunk's keys and values, before they join the KV cache
    float *att_out;    // (C, Q) attention output, before wo
    float *att;        // (n_heads * ATT_POSITIONS, S + ATT_POSITIONS - 1) scores of a block of positions
    float *att_q, *att_o; // (n_heads * ATT_POSITIONS, head_dim) the block's queries, its outputs
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
    int kv_type;       // KV_* (kernels.h): how the KV cache holds a key or value (--kv)
    size_t kv_row;     // bytes of one key or value of one head: kv_row_bytes(kv_type, head_dim)
    uint8_t *keys;     // (n_layers, n_kv_heads, S) rows: the KV cache's keys
    uint8_t *values;   // (n_layers, n_kv_heads, S) rows: its values
    uint8_t *chunk_keys, *chunk_values; // (C, n_kv_heads) rows: the chunk's own, before they join it
    int *tokens;       // (context,) the token at each position run so far (--session saves them)
    int *chosen;       // (C, n_layers, top_k) experts picked for each token of the last chunk
    float *chosen_w;   // (C, n_layers, top_k) their routing weights
    QuantInput *xq;    // (n_experts,) a batch's inputs quantized for q8/q6/q4 weights, C rows each
    int bf16_activations; // --bf16-activations: bf16 weights multiply activations rounded to bf16
    ThreadPool *pool;
    ExpertCache *expert_cache; // the model's, or NULL
    Counters counts;
} State;

// ----------------------------------------------------------------------------
// What mixtral.c offers eval.c and the test drivers

void model_load(Model *m, const char *path, LoadMode mode, ThreadPool *pool, uint64_t mem, int context, int chunk,
                int kv_type, int cache_policy);
void model_free(Model *m);
void state_init(State *s, const Config *p, int context, int chunk, int kv_type, int bf16_activations, ThreadPool *pool);
void state_free(State *s, const Config *p);
// Runs n tokens at positions pos0.. through the model; the logits (n, V) with
// all_logits, else (1, V) of the last token.
float *forward_chunk(Model *m, State *s, const int *ids, int n, int pos0, int all_logits);
int argmax(const float *x, int n);
// The matrices of a model, by Matrix.id: how many, and the Hugging Face name of one.
int matrix_count(const Config *p);
void matrix_name(const Config *p, int id, char *out, size_t size);
// Writes the text of ids through decoder d to stdout.
void echo_ids(TokenDecoder *d, const Tokenizer *t, const int *ids, int n);
// Reads and formats a conversation file into ids (BOS first), or dies saying why.
void read_conversation(const Model *m, const char *path, IdList *ids, Conversation *conv);
// Tokens in a chunk that starts at i of n: the chunk loop's step.
static inline int chunk_len(int n, int i, int chunk) { return n - i < chunk ? n - i : chunk; }

#endif
