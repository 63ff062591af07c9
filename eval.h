// eval.h: the evaluation tools and test hooks (eval.c), and the output files
// the program writes: under a temporary name, renamed when complete, removed
// if the run dies first, and never onto one of the run's inputs.
#ifndef EVAL_H
#define EVAL_H

#include <stdio.h>

#include "mixtral.h"

typedef struct { FILE *f; char *path, *tmp; } Output;

// Opens path.partial for writing, or dies (also when path is one of inputs).
// o must stay where it is until output_close (the cleanup on exit holds it).
void output_open(Output *o, const char *path, const char *const *inputs, int n_inputs);
void output_write(Output *o, const void *data, size_t size, size_t n);
// Renames the complete file into place, or dies having removed it.
void output_close(Output *o);

// "1,415,2936" (commas or spaces) as ids, each checked against the vocabulary;
// flag names the option in error messages.
IdList parse_ids(const char *flag, const char *str, int vocab_size);
// --perplexity TEXT (windows of the state's context), --kl-base OUT, --kl-divergence BASE,
// --imatrix OUT (the importance matrix of the text, for export.py --imatrix).
void eval_perplexity(Model *m, State *s, const char *model_path, const char *text_path, const char *base_out,
                     const char *base_in, const char *imatrix_out);
// --ids with --dump-logits (and --dump-experts).
void eval_dump_logits(Model *m, State *s, const char *model_path, const int *ids, int n, const char *logits_path,
                      const char *experts_path);
void eval_tokenize_file(const Tokenizer *t, const char *path);
void eval_detokenize(const Tokenizer *t, const char *list);
void eval_chat_ids(const Model *m, const char *path);

#endif
