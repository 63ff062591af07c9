// session.h: --session FILE, a run's tokens and KV cache kept for the next run
// of the same model (llama.cpp's --prompt-cache). A later run whose prompt or
// conversation starts with the same tokens reads their keys and values back
// instead of computing them, and processes only the rest.
#ifndef SESSION_H
#define SESSION_H

#include "mixtral.h"

// The tokens at the start of ids[0..n) whose keys and values the session file
// at path holds, read into the state's KV cache (and s->tokens), at most n - 1
// (the last token is always run, for its logits); 0 if there is no such file.
// A file of another model, another KV type or context, a truncated or corrupt
// one, is refused: one line, exit 1, the file left as it is.
int session_resume(const char *path, const Model *m, State *s, const int *ids, int n);
// The same from the file's bytes (path names it in messages); the fuzz target's way in.
int session_resume_bytes(const uint8_t *raw, size_t len, const char *path, const Model *m, State *s, const int *ids,
                         int n);
// What a session file holds to name its model and to check its bytes.
uint64_t session_model_hash(const Model *m);
uint64_t session_checksum(const void *data, size_t n);
// Writes the first n tokens of the state and their keys and values to path,
// whole or not at all (inputs: the files it must not overwrite).
void session_save(const char *path, const Model *m, const State *s, int n, const char *const *inputs, int n_inputs);

#endif
