// chat.c: Mistral's instruct format and the conversation-file reader (chat.h).

#include "chat.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char chat_error[512]; // the last error message

static void out_of_memory(void) {
    fputs("mixtral: error: out of memory\n", stderr);
    exit(1);
}

static void *chat_alloc(size_t n) {
    void *p = calloc(n ? n : 1, 1);
    if (!p) out_of_memory();
    return p;
}

void ids_push(IdList *l, int id) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        int *ids = realloc(l->ids, (size_t)l->cap * sizeof(int));
        if (!ids) out_of_memory();
        l->ids = ids;
    }
    l->ids[l->n++] = id;
}

void ids_push_text(IdList *l, const Tokenizer *t, const char *text, size_t len) {
    int *ids;
    int n = tokenizer_encode(t, text, len, &ids);
    if (n < 0) out_of_memory();
    for (int i = 0; i < n; i++) ids_push(l, ids[i]);
    free(ids);
}

// ----------------------------------------------------------------------------
// the instruct format

void chat_format_user(IdList *out, const Tokenizer *t, const char *system, const char *text, size_t len) {
    size_t slen = system && *system ? strlen(system) : 0;
    char *content = chat_alloc(slen + len + 32);
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
        char *s = chat_alloc(n + 32);
        memcpy(s, "[INST] ", 7);
        memcpy(s + 7, content, n);
        memcpy(s + 7 + n, " [/INST]", 8);
        ids_push_text(out, t, s, n + 15);
        free(s);
    }
    free(content);
}

const Message *chat_last_message(const Conversation *c) {
    for (int i = c->n - 1; i >= 0; i--)
        if (c->msgs[i].role != ROLE_SYSTEM) return &c->msgs[i];
    return NULL;
}

int chat_open_ending(const Conversation *c) {
    const Message *last = chat_last_message(c);
    return last && last->role == ROLE_ASSISTANT && (c->continue_final || last->prefix);
}

const char *chat_format(IdList *out, const Tokenizer *t, int bos_id, int eos_id, const Conversation *c) {
    size_t slen = 0;
    for (int i = 0; i < c->n; i++) if (c->msgs[i].role == ROLE_SYSTEM) slen += c->msgs[i].len + 2;
    char *system = chat_alloc(slen + 1);
    size_t o = 0;
    for (int i = 0; i < c->n; i++) {
        if (c->msgs[i].role != ROLE_SYSTEM) continue;
        if (o) { memcpy(system + o, "\n\n", 2); o += 2; }
        memcpy(system + o, c->msgs[i].content, c->msgs[i].len);
        o += c->msgs[i].len;
    }
    ids_push(out, bos_id);
    int expect = ROLE_USER, first_user = 1;
    for (int i = 0; i < c->n; i++) {
        const Message *msg = &c->msgs[i];
        if (msg->role == ROLE_SYSTEM) continue;
        if (msg->role != expect) {
            snprintf(chat_error, sizeof(chat_error),
                     "message %d is from the %s, but a conversation alternates user, assistant, user, ...", i,
                     msg->role == ROLE_USER ? "user" : "assistant");
            free(system);
            return chat_error;
        }
        if (msg->role == ROLE_USER) {
            chat_format_user(out, t, first_user ? system : NULL, msg->content, msg->len);
            first_user = 0;
            expect = ROLE_ASSISTANT;
        } else {
            ids_push_text(out, t, msg->content, msg->len);
            if (!chat_open_ending(c) || msg != chat_last_message(c)) ids_push(out, eos_id); // a reply ends with EOS
            expect = ROLE_USER;
        }
    }
    free(system);
    return NULL;
}

// ----------------------------------------------------------------------------
// a strict JSON reader (RFC 8259), for conversation files
//
// Strings are decoded into one scratch buffer as long as the file (decoded
// text is never longer than its source), so memory grows linearly with the
// file. An error longjmps back to chat_parse, which frees what was built.

typedef struct {
    const char *s;
    size_t n, i;
    char *scratch;        // (n+1,) the string being decoded
    jmp_buf fail;
    Conversation conv;    // being built
    int cap;              // messages conv.msgs has room for
    char *pending;        // the content of the message being read
    int found;            // "messages" seen
} Json;

static void json_fail(Json *j, const char *fmt, ...) {
    size_t line = 1, col = 1;
    for (size_t k = 0; k < j->i && k < j->n; k++) { if (j->s[k] == '\n') { line++; col = 1; } else col++; }
    char what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    snprintf(chat_error, sizeof(chat_error), "malformed JSON at line %zu, column %zu (byte %zu): %s", line, col, j->i, what);
    longjmp(j->fail, 1);
}

// A message error (not a JSON syntax error).
static void conv_fail(Json *j, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(chat_error, sizeof(chat_error), fmt, ap);
    va_end(ap);
    longjmp(j->fail, 1);
}

static void json_ws(Json *j) {
    while (j->i < j->n && (j->s[j->i] == ' ' || j->s[j->i] == '\t' || j->s[j->i] == '\r' || j->s[j->i] == '\n')) j->i++;
}

static int json_peek(Json *j) { json_ws(j); return j->i < j->n ? (unsigned char)j->s[j->i] : -1; }

static void json_expect(Json *j, char c) {
    if (json_peek(j) != (unsigned char)c) json_fail(j, "expected '%c'", c);
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

// Decodes a string into j->scratch (NUL-terminated; may contain NULs); returns its length.
static size_t json_string(Json *j) {
    json_expect(j, '"');
    char *out = j->scratch;
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
    out[o] = 0;
    return o;
}

// The decoded string in scratch equals `word` exactly (a NUL inside never matches).
static int scratch_is(const Json *j, size_t len, const char *word) {
    return len == strlen(word) && memcmp(j->scratch, word, len) == 0;
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
    json_fail(j, "expected ',' or '%c'", close);
    return 0;
}

// Opens an array or object; 1 if it has elements.
static int json_open(Json *j, char open, char close) {
    json_expect(j, open);
    if (json_peek(j) == (unsigned char)close) { j->i++; return 0; }
    return 1;
}

static int json_digits(Json *j) {
    size_t start = j->i;
    while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9') j->i++;
    return j->i > start;
}

// number = [ "-" ] ( "0" / 1-9 *DIGIT ) [ "." 1*DIGIT ] [ ( "e" / "E" ) [ "+" / "-" ] 1*DIGIT ]
static void json_number(Json *j) {
    if (j->i < j->n && j->s[j->i] == '-') j->i++;
    if (j->i < j->n && j->s[j->i] == '0') j->i++;
    else if (!json_digits(j)) json_fail(j, "expected a value");
    if (j->i < j->n && j->s[j->i] == '.') { j->i++; if (!json_digits(j)) json_fail(j, "malformed number"); }
    if (j->i < j->n && (j->s[j->i] == 'e' || j->s[j->i] == 'E')) {
        j->i++;
        if (j->i < j->n && (j->s[j->i] == '+' || j->s[j->i] == '-')) j->i++;
        if (!json_digits(j)) json_fail(j, "malformed number");
    }
}

// A JSON true or false: 1 or 0.
static int json_bool(Json *j) {
    json_peek(j);
    if (j->n - j->i >= 4 && !memcmp(j->s + j->i, "true", 4)) { j->i += 4; return 1; }
    if (j->n - j->i >= 5 && !memcmp(j->s + j->i, "false", 5)) { j->i += 5; return 0; }
    json_fail(j, "expected true or false");
    return 0;
}

static void json_skip(Json *j, int depth) {
    if (depth > 64) json_fail(j, "nested too deeply");
    int c = json_peek(j);
    if (c == '"') { json_string(j); return; }
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        if (json_open(j, (char)c, close)) do {
            if (c == '{') { json_string(j); json_expect(j, ':'); }
            json_skip(j, depth + 1);
        } while (json_more(j, close));
        return;
    }
    static const char *literals[] = {"true", "false", "null"};
    for (int k = 0; k < 3; k++) {
        size_t n = strlen(literals[k]);
        if (j->n - j->i >= n && !memcmp(j->s + j->i, literals[k], n)) { j->i += n; return; }
    }
    json_number(j);
}

// Writes at most 40 bytes of s to out as printable ASCII (others as \xNN), for error messages.
static void escape_for_message(const char *s, size_t len, char *out, size_t cap) {
    size_t o = 0;
    for (size_t k = 0; k < len && k < 40 && o + 5 < cap; k++) {
        unsigned char c = (unsigned char)s[k];
        if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') out[o++] = (char)c;
        else o += snprintf(out + o, cap - o, "\\x%02x", c);
    }
    if (len > 40 && o + 4 < cap) { memcpy(out + o, "...", 3); o += 3; }
    out[o] = 0;
}

static void parse_message(Json *j) {
    Message msg = {-1, NULL, 0, 0};
    int index = j->conv.n;
    if (json_open(j, '{', '}')) do {
        size_t flen = json_string(j);
        int field = scratch_is(j, flen, "role") ? 1 : scratch_is(j, flen, "content") ? 2 : scratch_is(j, flen, "prefix") ? 3 : 0;
        json_expect(j, ':');
        if (!field) { json_skip(j, 1); continue; }
        if (field == 3) { msg.prefix = json_bool(j); continue; }
        if (json_peek(j) != '"') json_fail(j, "expected a string");
        size_t vlen = json_string(j);
        if (field == 2) {
            free(msg.content);
            msg.content = j->pending = chat_alloc(vlen + 1); // freed by chat_parse if anything fails
            memcpy(msg.content, j->scratch, vlen);
            msg.len = vlen;
        } else {
            msg.role = scratch_is(j, vlen, "system") ? ROLE_SYSTEM : scratch_is(j, vlen, "user") ? ROLE_USER
                     : scratch_is(j, vlen, "assistant") ? ROLE_ASSISTANT : -2;
            if (msg.role == -2) {
                char shown[200];
                escape_for_message(j->scratch, vlen, shown, sizeof(shown));
                conv_fail(j, "message %d: unknown role \"%s\" (system, user or assistant)", index, shown);
            }
        }
    } while (json_more(j, '}'));
    if (msg.role < 0 || !msg.content) conv_fail(j, "message %d needs a \"role\" and a \"content\" string", index);
    if (j->conv.n == j->cap) {
        j->cap = j->cap ? 2 * j->cap : 8;
        Message *m = realloc(j->conv.msgs, (size_t)j->cap * sizeof(Message));
        if (!m) out_of_memory();
        j->conv.msgs = m;
    }
    j->conv.msgs[j->conv.n++] = msg;
    j->pending = NULL;
}

const char *chat_parse(const char *text, size_t len, Conversation *out) {
    Json *j = chat_alloc(sizeof(Json)); // on the heap: its fields stay valid across longjmp
    j->s = text;
    j->n = len;
    j->scratch = chat_alloc(len + 1);
    if (setjmp(j->fail)) {
        free(j->pending);
        chat_free(&j->conv);
        free(j->scratch);
        free(j);
        return chat_error;
    }
    if (json_open(j, '{', '}')) do {
        size_t klen = json_string(j);
        int messages = scratch_is(j, klen, "messages"), cont = scratch_is(j, klen, "continue_final_message");
        json_expect(j, ':');
        if (cont) j->conv.continue_final = json_bool(j);
        else if (messages) {
            if (j->found) json_fail(j, "a second \"messages\"");
            j->found = 1;
            if (json_open(j, '[', ']')) do parse_message(j);
            while (json_more(j, ']'));
        } else json_skip(j, 1);
    } while (json_more(j, '}'));
    if (json_peek(j) != -1) json_fail(j, "trailing characters after the object");
    if (!j->found) conv_fail(j, "no \"messages\" array");
    *out = j->conv;
    free(j->scratch);
    free(j);
    return NULL;
}

void chat_free(Conversation *c) {
    for (int i = 0; i < c->n; i++) free(c->msgs[i].content);
    free(c->msgs);
    c->msgs = NULL;
    c->n = 0;
}
