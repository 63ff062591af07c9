// eval.c: measuring a weight format (--perplexity, --kl-base, --kl-divergence)
// and the test hooks (--ids with --dump-logits/--dump-experts, --tokenize-file,
// --detokenize, --chat-ids-file), with the output files they write. Same
// binary, same flags: mixtral.c's main() calls these. Every output file is
// written whole or not at all.
#include "eval.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

// Parses "1,415,2936" (commas or spaces) into ids, checking every one against
// the vocabulary; `flag` names the option in error messages.
IdList parse_ids(const char *flag, const char *str, int vocab_size) {
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
void eval_tokenize_file(const Tokenizer *t, const char *path) {
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

void eval_detokenize(const Tokenizer *t, const char *list) {
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

// The outputs being written, so that a run that dies removes their partial
// files (die() exits; the atexit handler runs).
#define MAX_OUTPUTS 8
static Output *writing[MAX_OUTPUTS];

static void remove_partial_outputs(void) {
    for (int i = 0; i < MAX_OUTPUTS; i++)
        if (writing[i]) { fclose(writing[i]->f); unlink(writing[i]->tmp); writing[i] = NULL; }
}

static void track_output(Output *o, int on) {
    static int registered;
    if (!registered) { atexit(remove_partial_outputs); registered = 1; }
    for (int i = 0; i < MAX_OUTPUTS; i++)
        if (on ? !writing[i] : writing[i] == o) { writing[i] = on ? o : NULL; return; }
    if (on) die("too many output files at once");
}

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

void output_open(Output *o, const char *path, const char *const *inputs, int n_inputs) {
    output_check(path, inputs, n_inputs);
    *o = (Output){NULL, strdup(path), xcalloc(strlen(path) + 16, 1)};
    sprintf(o->tmp, "%s.partial", path);
    if (!o->path || !(o->f = fopen(o->tmp, "wb"))) die("cannot write %s: %s", o->tmp, strerror(errno));
    track_output(o, 1);
}

void output_write(Output *o, const void *data, size_t size, size_t n) {
    if (fwrite(data, size, n, o->f) != n) die("cannot write %s: %s", o->tmp, strerror(errno));
}

void output_close(Output *o) {
    track_output(o, 0);
    int failed = fflush(o->f) != 0 || ferror(o->f), err = errno;
    if (fclose(o->f) != 0 && !failed) failed = 1, err = errno;
    if (failed) { unlink(o->tmp); die("cannot write %s: %s", o->tmp, strerror(err)); }
    if (rename(o->tmp, o->path) != 0) { err = errno; unlink(o->tmp); die("cannot rename %s to %s: %s", o->tmp, o->path, strerror(err)); }
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

// --- the importance matrix (--imatrix) ------------------------------------------
//
// For every matrix the products read (all but the embedding), every expert on
// its own: the mean over the text's tokens of each input column's squared
// activation, which export.py --imatrix uses to weight the rounding error of
// q3 and q2 by how much each column matters. The file (little-endian):
//   "MXIMATRX", u32 version 1, u32 n, u64 tokens of text,
//   n times: u16 name bytes, the Hugging Face name, u32 cols, u64 tokens, f32 (cols,) mean squares

#define IMATRIX_MAGIC "MXIMATRX"

// Counts a matrix's inputs: one sum for each of its columns.
static void imatrix_track(Imatrix *im, const Matrix *M) {
    im->cols[M->id] = M->cols;
    im->sum[M->id] = xcalloc(M->cols, sizeof(double));
}

static Imatrix *imatrix_new(const Model *m) {
    const Config *p = &m->config;
    Imatrix *im = xcalloc(1, sizeof(Imatrix));
    im->n = matrix_count(p);
    im->cols = xcalloc(im->n, sizeof(int));
    im->sum = xcalloc(im->n, sizeof(double *));
    im->tokens = xcalloc(im->n, sizeof(uint64_t));
    const Weights *w = &m->weights; // every matrix that is multiplied (not the embedding, looked up)
    imatrix_track(im, &w->lm_head);
    for (int l = 0; l < p->n_layers; l++) {
        const Layer *L = &w->layers[l];
        imatrix_track(im, &L->wq), imatrix_track(im, &L->wk), imatrix_track(im, &L->wv), imatrix_track(im, &L->wo);
        for (int x = 0; x < p->n_experts; x++)
            imatrix_track(im, &L->experts[x].w1), imatrix_track(im, &L->experts[x].w3), imatrix_track(im, &L->experts[x].w2);
    }
    return im;
}

static void imatrix_write(const Imatrix *im, const Config *p, uint64_t text_tokens, const char *path,
                          const char *const *inputs, int n_inputs) {
    Output o;
    output_open(&o, path, inputs, n_inputs);
    uint32_t version = 1, n = 0;
    for (int id = 0; id < im->n; id++) n += im->sum[id] != NULL;
    output_write(&o, IMATRIX_MAGIC, 1, 8);
    output_write(&o, &version, 4, 1);
    output_write(&o, &n, 4, 1);
    output_write(&o, &text_tokens, 8, 1);
    float *mean = xcalloc(p->hidden_dim > p->dim ? p->hidden_dim : p->dim, sizeof(float));
    for (int id = 0; id < im->n; id++) {
        if (!im->sum[id]) continue;
        char name[160];
        matrix_name(p, id, name, sizeof(name));
        uint16_t len = (uint16_t)strlen(name);
        uint32_t cols = (uint32_t)im->cols[id];
        for (uint32_t k = 0; k < cols; k++) mean[k] = im->tokens[id] ? (float)(im->sum[id][k] / im->tokens[id]) : 0.0f;
        output_write(&o, &len, 2, 1);
        output_write(&o, name, 1, len);
        output_write(&o, &cols, 4, 1);
        output_write(&o, &im->tokens[id], 8, 1);
        output_write(&o, mean, 4, cols);
    }
    output_close(&o);
    free(mean);
}

static void imatrix_free(Imatrix *im) {
    for (int id = 0; id < im->n; id++) free(im->sum[id]);
    free(im->sum);
    free(im->cols);
    free(im->tokens);
    free(im);
}

void eval_perplexity(Model *m, State *s, const char *model_path, const char *text_path, const char *base_out,
                     const char *base_in, const char *imatrix_out) {
    const Config *p = &m->config;
    int V = p->vocab_size, W = s->context;
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
    const char *inputs[] = {model_path, text_path, base_in};
    if (imatrix_out) {
        output_check(imatrix_out, inputs, 3); // before the work
        if (base_out && !strcmp(base_out, imatrix_out)) die("--kl-base and --imatrix name the same file");
        s->counts.imatrix = imatrix_new(m);
    }
    if (base_out) {
        output_open(&out, base_out, inputs, 3);
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
        for (int pos = 0, c; pos < W - 1; pos += c) {
            c = chunk_len(W - 1, pos, s->chunk);
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
    if (imatrix_out) {
        imatrix_write(s->counts.imatrix, p, (uint64_t)windows * (W - 1), imatrix_out, inputs, 3);
        imatrix_free(s->counts.imatrix);
        s->counts.imatrix = NULL;
        printf("importance matrix of %d matrices over %d tokens written to %s\n", matrix_count(p) - 1, windows * (W - 1),
               imatrix_out);
    }
    free(lp);
    free(blp);
    free(kl);
    free(win);
    free(all.ids);
}

// The test hook: logits after every input position, raw little-endian f32 (n, V);
// optionally the chosen experts, int32 (n, n_layers, top_k).
void eval_dump_logits(Model *m, State *s, const char *model_path, const int *ids, int n,
                        const char *logits_path, const char *experts_path) {
    const Config *p = &m->config;
    if (n > s->context) die("%d ids but the context holds %d; use a larger -c", n, s->context);
    if (experts_path && !strcmp(experts_path, logits_path)) die("--dump-logits and --dump-experts name the same file");
    if (experts_path) output_check(experts_path, &model_path, 1); // before anything is written
    Output f, fe;
    output_open(&f, logits_path, &model_path, 1);
    if (experts_path) output_open(&fe, experts_path, &model_path, 1);
    for (int pos = 0, c; pos < n; pos += c) {
        c = chunk_len(n, pos, s->chunk);
        float *logits = forward_chunk(m, s, ids + pos, c, pos, 1);
        output_write(&f, logits, sizeof(float), (size_t)c * p->vocab_size);
        if (experts_path) output_write(&fe, s->chosen, sizeof(int), (size_t)c * p->n_layers * p->n_experts_per_tok);
    }
    output_close(&f);
    if (experts_path) output_close(&fe);
}

// --chat-ids-file: the ids a conversation file formats to, on one line.
void eval_chat_ids(const Model *m, const char *path) {
    IdList ids = {0};
    Conversation conv;
    read_conversation(m, path, &ids, &conv);
    for (int i = 0; i < ids.n; i++) printf(i ? " %d" : "%d", ids.ids[i]);
    printf("\n");
    chat_free(&conv);
    free(ids.ids);
}
