// chat.h: conversations in Mistral's instruct format, as mistral-common writes them,
// and a strict JSON reader (RFC 8259) for conversation files.
//
//   v1 (Mixtral-8x7B-Instruct): <s> encode("[INST] {user} [/INST]") encode("{assistant}") </s> ...
//   v3 (Mixtral-8x22B-Instruct): <s> [INST] encode("{user}") [/INST] encode("{assistant}") </s> ...
// where [INST] and [/INST] are control tokens in v3 and plain text in v1. A
// system prompt goes before the first user message, followed by a blank line.
//
// Errors on input are returned as messages, never exits: the callers (and the
// fuzz target) decide what to do with them.
#ifndef CHAT_H
#define CHAT_H

#include <stddef.h>

#include "tokenizer.h"

// A growable list of token ids.
typedef struct { int *ids; int n, cap; } IdList;

void ids_push(IdList *l, int id);
void ids_push_text(IdList *l, const Tokenizer *t, const char *text, size_t len); // encoded, no BOS

enum { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT };

typedef struct {
    int role;
    char *content;  // NUL-terminated, may hold NULs
    size_t len;
    int prefix;     // "prefix": true (mistral-common): an assistant message to be continued
} Message;

typedef struct {
    Message *msgs;
    int n;
    int continue_final; // "continue_final_message": true (Hugging Face's apply_chat_template)
} Conversation;

// Parses a conversation file, {"messages": [{"role": ..., "content": ...}, ...]}
// (with "prefix" on a message and "continue_final_message" on the object, both booleans).
// Returns NULL, or an error message (valid until the next call).
const char *chat_parse(const char *text, size_t len, Conversation *out);
void chat_free(Conversation *c);

// Appends one user turn: [INST] {system\n\n}{text} [/INST] (system may be NULL).
void chat_format_user(IdList *out, const Tokenizer *t, const char *system, const char *text, size_t len);
// Appends the ids of a whole conversation, BOS first; system messages are
// joined and go before the first user message. Every assistant message ends
// with EOS, but a final one that is to be continued (chat_open_ending) stays
// open. Returns NULL, or an error message if the roles do not alternate user,
// assistant, user, ...
const char *chat_format(IdList *out, const Tokenizer *t, int bos_id, int eos_id, const Conversation *c);
// The last message that is not a system message, or NULL.
const Message *chat_last_message(const Conversation *c);
// Whether the conversation ends with an assistant message to be continued: marked
// "prefix": true (mistral-common) or the file's "continue_final_message": true
// (Hugging Face). Otherwise it is complete, its last answer closed.
int chat_open_ending(const Conversation *c);

#endif
