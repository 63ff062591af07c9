// sample_draws: draws many tokens with mixtral.c's sampler from one set of
// logits, for tests/test_cli.py to compare the frequencies with the
// distribution the options define (computed there with numpy).
//
//   sample_draws LOGITS.f32 N TEMPERATURE TOP_K MIN_P TOP_P SEED
// LOGITS.f32: the logits, float32. Prints how often each token was drawn, one
// count a line.
#define MIXTRAL_NO_MAIN
#include "../mixtral.c"

int main(int argc, char **argv) {
    if (argc != 8) die("usage: sample_draws LOGITS.f32 N TEMPERATURE TOP_K MIN_P TOP_P SEED");
    size_t len;
    char *raw = read_file(argv[1], &len);
    int n = (int)(len / sizeof(float)), draws = atoi(argv[2]);
    if (n < 1) die("no logits in %s", argv[1]);
    float *logits = xcalloc(n, sizeof(float)), *work = xcalloc(n, sizeof(float));
    memcpy(logits, raw, n * sizeof(float));
    Sampler sm = {.temperature = strtof(argv[3], NULL), .top_k = atoi(argv[4]), .min_p = strtof(argv[5], NULL),
                  .top_p = strtof(argv[6], NULL), .repeat_penalty = 1.0f, .rng = strtoull(argv[7], NULL, 10)};
    sampler_init(&sm, n);
    int *count = xcalloc(n, sizeof(int));
    for (int i = 0; i < draws; i++) {
        memcpy(work, logits, n * sizeof(float));
        int token = sample(&sm, work, n);
        if (token < 0 || token >= n) die("drew token %d of %d", token, n);
        count[token]++;
    }
    for (int i = 0; i < n; i++) printf("%d\n", count[i]);
    sampler_free(&sm);
    free(count); free(work); free(logits); free(raw);
    return 0;
}
