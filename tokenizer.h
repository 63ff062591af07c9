// tokenizer.h: sentencepiece-compatible BPE tokenizer for Mistral/Mixtral models.
//
// The vocabulary travels inside the model file (see export.py); tokenizer_init
// parses that section. Encoding follows the sentencepiece library exactly for
// BPE models with the identity normalizer: spaces become U+2581, a dummy
// prefix is added, user-defined pieces match literally, pairs merge by score
// (ties to the left), and characters without a piece fall back to bytes.
#ifndef TOKENIZER_H
#define TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

// piece types, as in sentencepiece_model.proto
enum { PIECE_NORMAL = 1, PIECE_UNKNOWN = 2, PIECE_CONTROL = 3,
       PIECE_USER_DEFINED = 4, PIECE_UNUSED = 5, PIECE_BYTE = 6 };

typedef struct {
    int vocab_size;
    const char **piece;  // (vocab_size,) piece bytes, not NUL-terminated
    int *piece_len;      // (vocab_size,)
    float *score;        // (vocab_size,) merge priority: higher merges first
    uint8_t *type;       // (vocab_size,) PIECE_*
    int byte_id[256];    // id of the piece <0xXX>, or -1
    int unk_id;
    int add_dummy_prefix, byte_fallback;
    int *table;          // open-addressing hash of piece bytes -> id, (table_mask+1,)
    uint32_t table_mask;
    int max_piece_len;   // bytes
    // the user-defined pieces, which match literally (longest first), as a
    // trie of their bytes: node 0 is the root; a node's children are a list
    struct TrieNode { int child, sibling, id; uint8_t byte; } *trie;
    int trie_n;
} Tokenizer;

// Parses the tokenizer section of a model file. Returns NULL on success, or a
// message saying what is wrong with the section.
const char *tokenizer_init(Tokenizer *t, const void *section, uint64_t size, int vocab_size);
void tokenizer_free(Tokenizer *t);

// Encodes len bytes of text (any bytes, NUL included) without BOS/EOS.
// Returns the number of ids and sets *ids to a malloc'd array the caller frees.
int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int **ids);

// The id of a piece given by its exact text, or -1.
int tokenizer_lookup(const Tokenizer *t, const char *piece, int len);

// Streaming decoder: feed ids one at a time, get UTF-8 text out. Bytes from
// byte-fallback pieces are held until they form a whole character, so output
// is always valid UTF-8; invalid byte runs come out as U+FFFD, one per byte.
typedef struct {
    unsigned char pending[4]; // bytes of an unfinished UTF-8 character
    int n_pending;
    int at_start;             // no text piece emitted yet: drop its leading space
} TokenDecoder;

void decoder_init(TokenDecoder *d);
// Appends the text of `id` to out (at most decoder_max_bytes(t) bytes); returns
// the number of bytes written.
int decoder_put(TokenDecoder *d, const Tokenizer *t, int id, char *out);
// The most bytes one decoder_put or decoder_flush call writes.
int decoder_max_bytes(const Tokenizer *t);
// Flushes held bytes at the end of a stream (as U+FFFD each); returns bytes written.
int decoder_flush(TokenDecoder *d, char *out);

#endif
