// tokenizer.c: sentencepiece-compatible BPE encoding and streaming decoding.
// See tokenizer.h for the interface; the rules below follow the sentencepiece
// library (normalizer.cc, bpe_model.cc, sentencepiece_processor.cc) for BPE
// models with the identity normalizer, which is what Mistral ships.
#include "tokenizer.h"

#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------
// loading: the section written by export.py's tokenizer_blob()
//   u32 n_pieces, u32 flags, i32 unk_id, u32 max_piece_bytes,
//   then per piece: f32 score, u16 type, u16 n_bytes, bytes

enum { TOK_ADD_DUMMY_PREFIX = 1, TOK_BYTE_FALLBACK = 2 };

static uint32_t hash_bytes(const char *s, int len) { // FNV-1a
    uint32_t h = 2166136261u;
    for (int i = 0; i < len; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

int tokenizer_lookup(const Tokenizer *t, const char *piece, int len) {
    for (uint32_t i = hash_bytes(piece, len) & t->table_mask;; i = (i + 1) & t->table_mask) {
        int id = t->table[i];
        if (id < 0) return -1;
        if (t->piece_len[id] == len && memcmp(t->piece[id], piece, len) == 0) return id;
    }
}

static int hex_digit(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

// The trie of user-defined pieces: a walk from a position of the text finds
// the longest one there in time proportional to its length (trying every length
// with the hash table made long user-defined pieces cost cubic time). A piece
// whose text an earlier piece already has is not one (the first id wins, as in
// the lookup table).
static const char *build_trie(Tokenizer *t) {
    size_t bytes = 0;
    for (int id = 0; id < t->vocab_size; id++) if (t->type[id] == PIECE_USER_DEFINED) bytes += t->piece_len[id];
    t->trie = malloc((bytes + 1) * sizeof(*t->trie));
    if (!t->trie) return "out of memory";
    t->trie[0] = (struct TrieNode){-1, -1, -1, 0};
    t->trie_n = 1;
    for (int id = 0; id < t->vocab_size; id++) {
        int len = t->piece_len[id];
        if (t->type[id] != PIECE_USER_DEFINED || len == 0 || tokenizer_lookup(t, t->piece[id], len) != id) continue;
        int node = 0;
        for (int k = 0; k < len; k++) {
            uint8_t b = (uint8_t)t->piece[id][k];
            int c = t->trie[node].child;
            while (c >= 0 && t->trie[c].byte != b) c = t->trie[c].sibling;
            if (c < 0) {
                c = t->trie_n++;
                t->trie[c] = (struct TrieNode){-1, t->trie[node].child, -1, b};
                t->trie[node].child = c;
            }
            node = c;
        }
        t->trie[node].id = id;
    }
    return NULL;
}

// Bytes of the longest user-defined piece at s (n bytes available), or 0.
static int longest_user_piece(const Tokenizer *t, const char *s, size_t n) {
    int node = 0, best = 0;
    for (size_t k = 0; k < n; k++) {
        int c = t->trie[node].child;
        while (c >= 0 && t->trie[c].byte != (uint8_t)s[k]) c = t->trie[c].sibling;
        if (c < 0) break;
        node = c;
        if (t->trie[node].id >= 0) best = (int)k + 1;
    }
    return best;
}

const char *tokenizer_init(Tokenizer *t, const void *section, uint64_t size, int vocab_size) {
    memset(t, 0, sizeof(*t));
    const unsigned char *p = section, *end = p + size;
    if (size < 16) return "too short";
    uint32_t n, flags, max_len;
    int32_t unk;
    memcpy(&n, p, 4); memcpy(&flags, p + 4, 4); memcpy(&unk, p + 8, 4); memcpy(&max_len, p + 12, 4);
    p += 16;
    if ((int64_t)n != vocab_size) return "piece count differs from the vocabulary size";
    t->vocab_size = vocab_size;
    t->unk_id = unk >= 0 && unk < vocab_size ? unk : -1;
    t->add_dummy_prefix = (flags & TOK_ADD_DUMMY_PREFIX) != 0;
    t->byte_fallback = (flags & TOK_BYTE_FALLBACK) != 0;
    t->piece = calloc(n, sizeof(char *));
    t->piece_len = calloc(n, sizeof(int));
    t->score = calloc(n, sizeof(float));
    t->type = calloc(n, 1);
    uint32_t cap = 1;
    while (cap < 2 * n) cap <<= 1;
    t->table = malloc(cap * sizeof(int));
    t->table_mask = cap - 1;
    if (!t->piece || !t->piece_len || !t->score || !t->type || !t->table) return "out of memory";
    memset(t->table, 0xff, cap * sizeof(int)); // all -1: empty
    for (int i = 0; i < 256; i++) t->byte_id[i] = -1;
    for (uint32_t id = 0; id < n; id++) {
        if (end - p < 8) return "truncated";
        uint16_t type, len;
        memcpy(&t->score[id], p, 4); memcpy(&type, p + 4, 2); memcpy(&len, p + 6, 2);
        p += 8;
        if (end - p < len) return "truncated";
        if (type < PIECE_NORMAL || type > PIECE_BYTE) return "unknown piece type";
        if (len > max_len) return "piece longer than the recorded maximum";
        t->piece[id] = (const char *)p;
        t->piece_len[id] = len;
        t->type[id] = (uint8_t)type;
        p += len;
        if (len > t->max_piece_len) t->max_piece_len = len;
        if (type == PIECE_BYTE) { // "<0xAB>"
            int hi, lo;
            if (len != 6 || memcmp(t->piece[id], "<0x", 3) || t->piece[id][5] != '>' ||
                (hi = hex_digit(t->piece[id][3])) < 0 || (lo = hex_digit(t->piece[id][4])) < 0)
                return "malformed byte piece";
            t->byte_id[hi * 16 + lo] = (int)id;
        }
        // Byte pieces are not text ("<0x41>" typed by a user stays text), and
        // empty pieces pad the vocabulary: neither goes in the lookup table.
        if (len == 0 || type == PIECE_BYTE) continue;
        if (tokenizer_lookup(t, t->piece[id], len) >= 0) continue; // first of duplicates wins
        uint32_t i = hash_bytes(t->piece[id], len) & t->table_mask;
        while (t->table[i] >= 0) i = (i + 1) & t->table_mask;
        t->table[i] = (int)id;
    }
    if (p != end) return "trailing bytes after the last piece";
    return build_trie(t);
}

void tokenizer_free(Tokenizer *t) {
    free(t->piece); free(t->piece_len); free(t->score); free(t->type); free(t->table); free(t->trie);
    memset(t, 0, sizeof(*t));
}

// ----------------------------------------------------------------------------
// UTF-8, with sentencepiece's rules: a sequence is valid if its lead byte,
// trail bytes, length and code point range are right; otherwise its first
// byte alone is invalid (and becomes U+FFFD), and decoding resumes after it.

static const char REPLACEMENT[] = "\xEF\xBF\xBD"; // U+FFFD

// Length of the valid character at s (n bytes available), or 0 if s[0] does not
// start a valid one.
static int utf8_valid_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    int len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    if (len == 0 || n < (size_t)len) return 0;
    uint32_t cp = c & (0x7F >> len);
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[len] || (cp >= 0xD800 && cp < 0xE000) || cp > 0x10FFFF) return 0;
    return len;
}

// ----------------------------------------------------------------------------
// encoding

// normalizer.cc with the identity normalizer: each ' ' becomes U+2581 "▁", one
// "▁" is prepended (add_dummy_prefix), and each byte that does not start a
// valid UTF-8 character becomes U+FFFD. Returns the new length.
static size_t normalize(const Tokenizer *t, const char *text, size_t len, char *out) {
    size_t o = 0;
    if (len > 0 && t->add_dummy_prefix) { memcpy(out, "\xE2\x96\x81", 3); o = 3; }
    for (size_t i = 0; i < len;) {
        int n = utf8_valid_len((const unsigned char *)text + i, len - i);
        if (n == 0) { memcpy(out + o, REPLACEMENT, 3); o += 3; i += 1; }
        else if (n == 1 && text[i] == ' ') { memcpy(out + o, "\xE2\x96\x81", 3); o += 3; i += 1; }
        else { memcpy(out + o, text + i, n); o += n; i += n; }
    }
    return o;
}

typedef struct {
    int start, len;   // bytes of the normalized text this symbol covers
    int prev, next;   // neighbours in the linked list of live symbols (-1: none)
    int frozen;       // a user-defined piece: never merged
} Symbol;

typedef struct {
    float score;      // the merged piece's score
    int left, right;  // symbol indices
    int len;          // bytes of the merged piece: stale if the symbols changed
} Pair;

// Max-heap order of bpe_model.cc: higher score first, then the leftmost pair.
static int pair_before(const Pair *a, const Pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

typedef struct { Pair *a; int n, cap; } Heap;

static int heap_push(Heap *h, Pair p) {
    if (h->n == h->cap) {
        int cap = h->cap ? 2 * h->cap : 64;
        Pair *a = realloc(h->a, cap * sizeof(Pair));
        if (!a) return -1;
        h->a = a; h->cap = cap;
    }
    int i = h->n++;
    while (i > 0 && pair_before(&p, &h->a[(i - 1) / 2])) { h->a[i] = h->a[(i - 1) / 2]; i = (i - 1) / 2; }
    h->a[i] = p;
    return 0;
}

static Pair heap_pop(Heap *h) {
    Pair top = h->a[0], last = h->a[--h->n];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && pair_before(&h->a[c + 1], &h->a[c])) c++;
        if (!pair_before(&h->a[c], &last)) break;
        h->a[i] = h->a[c];
        i = c;
    }
    if (h->n > 0) h->a[i] = last;
    return top;
}

// Pieces that merges may produce: normal, user-defined and unused ones (the
// library's pieces_ map). Control, unknown and byte pieces are never made from text.
static int mergeable_id(const Tokenizer *t, const char *s, int len) {
    int id = tokenizer_lookup(t, s, len);
    if (id < 0) return -1;
    int ty = t->type[id];
    return ty == PIECE_NORMAL || ty == PIECE_USER_DEFINED || ty == PIECE_UNUSED ? id : -1;
}

static int push_pair(Heap *h, const Tokenizer *t, const char *text, const Symbol *sym, int left, int right) {
    if (left < 0 || right < 0 || sym[left].frozen || sym[right].frozen) return 0;
    int len = sym[left].len + sym[right].len;
    if (len > t->max_piece_len) return 0;
    int id = mergeable_id(t, text + sym[left].start, len);
    if (id < 0) return 0;
    Pair p = {t->score[id], left, right, len};
    return heap_push(h, p);
}

int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int **ids_out) {
    *ids_out = NULL;
    // normalized text: at most 3 bytes per input byte, plus the dummy prefix
    char *norm = malloc(3 * len + 4);
    Symbol *sym = malloc((len + 1) * sizeof(Symbol));
    Heap heap = {0};
    int *ids = NULL, n_ids = 0, nsym = 0;
    if (!norm || !sym) goto oom;
    size_t nlen = normalize(t, text, len, norm);

    // Split into symbols: the longest user-defined piece at this point, else
    // one UTF-8 character (normalize() made every character valid).
    for (size_t i = 0; i < nlen;) {
        int n = longest_user_piece(t, norm + i, nlen - i), frozen = n > 0;
        if (!n) n = utf8_valid_len((const unsigned char *)norm + i, nlen - i);
        sym[nsym] = (Symbol){(int)i, n, nsym - 1, -1, frozen};
        if (nsym > 0) sym[nsym - 1].next = nsym;
        nsym++;
        i += n;
    }

    // Merge the best adjacent pair until none is left: a heap of candidate pairs,
    // with pairs made stale by an earlier merge skipped when they come up.
    for (int i = 0; i + 1 < nsym; i++)
        if (push_pair(&heap, t, norm, sym, i, i + 1)) goto oom;
    while (heap.n > 0) {
        Pair top = heap_pop(&heap);
        Symbol *l = &sym[top.left], *r = &sym[top.right];
        if (l->len == 0 || r->len == 0 || l->len + r->len != top.len || l->next != top.right) continue;
        l->len += r->len;
        l->next = r->next;
        if (r->next >= 0) sym[r->next].prev = top.left;
        r->len = 0;
        if (push_pair(&heap, t, norm, sym, l->prev, top.left) ||
            push_pair(&heap, t, norm, sym, top.left, l->next)) goto oom;
    }

    // Symbols to ids; a symbol without a piece becomes its bytes.
    ids = malloc((nlen + 1) * sizeof(int));
    if (!ids) goto oom;
    for (int i = nsym > 0 ? 0 : -1; i >= 0; i = sym[i].next) {
        int id = tokenizer_lookup(t, norm + sym[i].start, sym[i].len);
        if (id >= 0) { ids[n_ids++] = id; continue; }
        for (int b = 0; b < sym[i].len; b++) {
            int bid = t->byte_fallback ? t->byte_id[(unsigned char)norm[sym[i].start + b]] : -1;
            if (bid >= 0) ids[n_ids++] = bid;
            else if (t->unk_id >= 0) { ids[n_ids++] = t->unk_id; break; } // no fallback: one <unk>
        }
    }
    free(norm); free(sym); free(heap.a);
    *ids_out = ids;
    return n_ids;
oom:
    free(norm); free(sym); free(heap.a); free(ids);
    return -1;
}

// ----------------------------------------------------------------------------
// decoding

void decoder_init(TokenDecoder *d) {
    memset(d, 0, sizeof(*d));
    d->at_start = 1;
}

// Emits what can be decided about the pending bytes: whole characters, and
// U+FFFD for a byte that cannot start one. With `final`, nothing is left waiting.
static int drain(TokenDecoder *d, char *out, int final) {
    int o = 0;
    while (d->n_pending > 0) {
        int n = utf8_valid_len(d->pending, d->n_pending);
        if (n == 0) {
            // Invalid now, or just incomplete? Incomplete if more bytes could still make it valid.
            unsigned c = d->pending[0];
            int need = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
            int could = !final && need > d->n_pending;
            for (int i = 1; could && i < d->n_pending; i++) could = (d->pending[i] & 0xC0) == 0x80;
            if (could) break;
            memcpy(out + o, REPLACEMENT, 3);
            o += 3;
            n = 1;
        } else {
            memcpy(out + o, d->pending, n);
            o += n;
        }
        d->n_pending -= n;
        memmove(d->pending, d->pending + n, d->n_pending);
    }
    return o;
}

int decoder_flush(TokenDecoder *d, char *out) { return drain(d, out, 1); }

// A piece's text is never longer than the piece ("\xE2\x96\x81" becomes one
// space), " ⁇ " for <unk> is 5 bytes, and before either up to 4 held bytes may
// come out as U+FFFD (3 bytes each).
int decoder_max_bytes(const Tokenizer *t) {
    return (t->max_piece_len > 5 ? t->max_piece_len : 5) + 4 * 3;
}

int decoder_put(TokenDecoder *d, const Tokenizer *t, int id, char *out) {
    if (id < 0 || id >= t->vocab_size) return 0;
    int ty = t->type[id];
    if (ty == PIECE_BYTE) {
        const char *s = t->piece[id];
        d->at_start = 0;
        d->pending[d->n_pending++] = (unsigned char)(hex_digit(s[3]) * 16 + hex_digit(s[4]));
        return drain(d, out, 0);
    }
    // Any other piece ends a run of bytes: what is left of it is invalid.
    int o = drain(d, out, 1);
    if (ty == PIECE_CONTROL) return o; // <s>, [INST]: invisible, and the text has not started
    int first = d->at_start;
    d->at_start = 0;
    if (ty == PIECE_UNKNOWN) { memcpy(out + o, " \xE2\x81\x87 ", 5); return o + 5; } // " ⁇ "
    const char *s = t->piece[id];
    int len = t->piece_len[id];
    // The dummy prefix: the first piece's leading "▁" is not a space in the text.
    if (first && t->add_dummy_prefix && len >= 3 && !memcmp(s, "\xE2\x96\x81", 3)) { s += 3; len -= 3; }
    for (int i = 0; i < len;) {
        if (i + 3 <= len && !memcmp(s + i, "\xE2\x96\x81", 3)) { out[o++] = ' '; i += 3; }
        else out[o++] = s[i++];
    }
    return o;
}
