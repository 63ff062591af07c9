// kernels_test: every kernel of this build (kernels.h) against its portable
// reference (ref_*), directly, on random data with odd sizes.
//
//   kernels_test [SEED]
//
// Two kinds of data for each kernel:
//   exact:  small integers and power-of-two scales, so that every product and
//           every partial sum is exact in float: whatever order a kernel adds
//           in, it must give the reference's result bit for bit (this is where
//           "integer sums are exact" is checked);
//   random: general values; the results must agree within the rounding of
//           float sums in another order: (terms + 8) * 2^-23 of the sum of the
//           terms' absolute values.
// gemm_quant must also give one token's results bit for bit whether it runs
// alone or with others.
// quantize_blocks must equal its reference bit for bit on any data.
// Prints the first differences and exits 1 on any mismatch.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels.h"

static uint64_t rng_state;
static uint32_t rnd(void) { // xorshift64*
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1DULL) >> 32);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (rnd() >> 8) / 16777216.0f; }
static int irange(int lo, int hi) { return lo + (int)(rnd() % (uint32_t)(hi - lo + 1)); } // lo..hi

static int failures, checks;

// Compares got with want: bit for bit (tol < 0) or within tol.
static void expect(const char *what, int index, float got, float want, double tol) {
    checks++;
    int ok = tol < 0 ? memcmp(&got, &want, sizeof(float)) == 0 : fabs((double)got - want) <= tol;
    if (ok) return;
    if (failures++ < 10)
        fprintf(stderr, "FAIL %s [%d]: kernel %.9g, reference %.9g (difference %.3g, allowed %s%.3g)\n", what, index,
                got, want, (double)got - want, tol < 0 ? "exactly " : "", tol < 0 ? 0.0 : tol);
}

static double tolerance(int terms, double abs_sum) { return (terms + 8) * ldexp(1.0, -23) * abs_sum + 1e-30; }

// A random quantized activation of M tokens of K values: int8 values in -lim..lim,
// scales 2^-0..2^-max_shift when exact, else random.
static QuantX make_quantx(int M, int K, int lim, int exact, int max_shift) {
    int nb = K / QBLOCK;
    QuantX x = {malloc((size_t)M * K), malloc((size_t)M * nb * sizeof(float)), malloc((size_t)M * nb * 2 * sizeof(int32_t))};
    for (int i = 0; i < M * K; i++) x.q[i] = (int8_t)irange(-lim, lim);
    for (int b = 0; b < M * nb; b++) {
        x.scale[b] = exact ? ldexpf(1.0f, -irange(0, max_shift)) : uniform(1e-3f, 0.1f);
        int s = 0;
        for (int i = 0; i < QBLOCK; i++) s += x.q[(size_t)b * QBLOCK + i];
        x.qoff[2 * b] = -8 * s;
        x.qoff[2 * b + 1] = -128 * s;
    }
    return x;
}

static void free_quantx(QuantX *x) { free(x->q); free(x->scale); free(x->qoff); }

// A float in the normal range of f16, as f16 bits (mantissa truncated).
static uint16_t to_f16(float f) {
    union { float f; uint32_t u; } v = {f};
    uint32_t sign = v.u >> 16 & 0x8000, exp = (v.u >> 23 & 255) - 112, man = v.u >> 13 & 1023;
    return (uint16_t)(sign | exp << 10 | man);
}

// A q8, q4, q6, q3 or q2 matrix of N rows (padded to whole groups) in the layout
// of kernels.h, random bytes: exact: q in -5..5 (q8) or -4..4 (q4), any level
// (q3, q2) and scales 2^-0..2^-max_shift; else any q and random scales.
static uint8_t *make_matrix(int type, int N, int K, int exact, int max_shift) {
    int nb = K / QBLOCK, groups = (N + QROWS - 1) / QROWS;
    size_t gb = quant_group_bytes(type, K);
    uint8_t *w = malloc(gb * groups);
    for (int g = 0; g < groups; g++) {
        uint8_t *grp = w + gb * g;
        if (weight_is_coded(type)) { // q3, q2: row scales, then any bytes (every byte is a valid book or code)
            for (int l = 0; l < QROWS; l++) {
                uint16_t h = to_f16(exact ? ldexpf(1.0f, -irange(0, max_shift)) : uniform(1e-3f, 0.05f) * (irange(0, 1) ? 1 : -1));
                memcpy(grp + 2 * l, &h, 2);
            }
            for (size_t i = 32; i < gb; i++) grp[i] = (uint8_t)irange(0, 255);
            continue;
        }
        for (int i = 0; i < nb * QROWS; i++) {
            uint16_t h = to_f16(exact ? ldexpf(1.0f, -irange(0, max_shift)) : uniform(1e-3f, 0.05f) * (irange(0, 1) ? 1 : -1));
            memcpy(grp + 2 * i, &h, 2);
        }
        for (size_t i = (size_t)nb * 32; i < gb; i++) {
            if (type == WEIGHT_Q8) grp[i] = (uint8_t)(exact ? 128 + irange(-5, 5) : 128 + irange(-127, 127));
            else grp[i] = (uint8_t)(exact ? irange(4, 12) | irange(4, 12) << 4 : irange(0, 255));
        }
    }
    return w;
}

// The sum of the absolute values of the terms that row n . token add up, for the tolerance.
static double quant_abs_sum(int type, const uint8_t *w, int K, int n, const QuantX *x) {
    float row[4096 * 4];
    dequant_row(type, w, K, n, row); // w * dw, exactly
    double s = 0;
    for (int j = 0; j < K; j++) s += fabs((double)row[j] * x->q[j] * x->scale[j / QBLOCK]);
    return s;
}

static void test_dot_float(void) {
    static const int sizes[] = {1, 3, 7, 8, 9, 31, 33, 64, 127, 1000, 4099};
    for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++)
        for (int exact = 0; exact < 2; exact++) {
            int n = sizes[si];
            float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
            uint16_t *h = malloc(n * sizeof(uint16_t));
            double abs_sum = 0, abs_sum_h = 0;
            for (int i = 0; i < n; i++) {
                a[i] = exact ? (float)irange(-8, 8) : uniform(-1, 1);
                b[i] = exact ? (float)irange(-8, 8) : uniform(-1, 1);
                union { float f; uint32_t u; } v = {a[i]};
                h[i] = (uint16_t)(v.u >> 16); // exact for small integers; truncation otherwise
                abs_sum += fabs((double)a[i] * b[i]);
                abs_sum_h += fabs((double)bf16_to_f32(h[i]) * b[i]);
            }
            expect(exact ? "dot_f32 exact" : "dot_f32", n, dot_f32(a, b, n), ref_dot_f32(a, b, n),
                   exact ? -1 : tolerance(n, abs_sum));
            expect(exact ? "dot_bf16 exact" : "dot_bf16", n, dot_bf16(h, b, n), ref_dot_bf16(h, b, n),
                   exact ? -1 : tolerance(n, abs_sum_h));
            free(a);
            free(b);
            free(h);
        }
}

// gemm_bf16 (f32 activations) and gemm_bf16x (bf16 activations, --bf16-activations) against their
// references (one dot product at a time): rows and tokens that are not whole tiles, K with a tail
// after the last 16 or 32 and long enough for spans; and one token at a time gives the same
// results as many, bit for bit.
static void test_gemm_bf16(int bf16_activations) {
    static const int Ks[] = {1, 15, 16, 32, 33, 100, 1024, 2500}, Ns[] = {1, 3, 4, 5, 9}, Ms[] = {1, 2, 4, 5, 9};
    const char *name = bf16_activations ? "gemm_bf16x" : "gemm_bf16";
    for (size_t ki = 0; ki < sizeof(Ks) / sizeof(Ks[0]); ki++)
        for (size_t ni = 0; ni < sizeof(Ns) / sizeof(Ns[0]); ni++)
            for (size_t mi = 0; mi < sizeof(Ms) / sizeof(Ms[0]); mi++) {
                int K = Ks[ki], N = Ns[ni], M = Ms[mi];
                size_t ldo = (size_t)N + 2;
                uint16_t *w = malloc((size_t)N * K * sizeof(uint16_t)), *xb = malloc((size_t)M * K * sizeof(uint16_t));
                float *x = malloc((size_t)M * K * sizeof(float));
                for (size_t i = 0; i < (size_t)N * K; i++) w[i] = f32_to_bf16(uniform(-1, 1));
                for (size_t i = 0; i < (size_t)M * K; i++) x[i] = uniform(-1, 1);
                to_bf16(x, xb, (int64_t)M * K);
                if (bf16_activations) // the activations the products see
                    for (size_t i = 0; i < (size_t)M * K; i++) x[i] = bf16_to_f32(xb[i]);
                float *got = calloc((size_t)M * ldo, sizeof(float)), *want = calloc((size_t)M * ldo, sizeof(float));
                if (bf16_activations) {
                    gemm_bf16x(w, K, N, xb, M, got, ldo);
                    ref_gemm_bf16x(w, K, N, xb, M, want, ldo);
                } else {
                    gemm_bf16(w, K, N, x, M, got, ldo);
                    ref_gemm_bf16(w, K, N, x, M, want, ldo);
                }
                char what[64], one_what[64], past[64];
                snprintf(what, sizeof(what), "%s K=%d N=%d M=%d", name, K, N, M);
                snprintf(one_what, sizeof(one_what), "%s one row, one token vs the tile", name);
                snprintf(past, sizeof(past), "%s writes past N", name);
                for (int m = 0; m < M; m++) {
                    for (int r = 0; r < N; r++) {
                        double abs_sum = 0;
                        for (int k = 0; k < K; k++) abs_sum += fabs((double)bf16_to_f32(w[(size_t)r * K + k]) * x[(size_t)m * K + k]);
                        expect(what, r, got[m * ldo + r], want[m * ldo + r], tolerance(K, abs_sum));
                        float one;
                        if (bf16_activations) gemm_bf16x(w + (size_t)r * K, K, 1, xb + (size_t)m * K, 1, &one, 1);
                        else gemm_bf16(w + (size_t)r * K, K, 1, x + (size_t)m * K, 1, &one, 1);
                        expect(one_what, r, one, got[m * ldo + r], -1);
                    }
                    for (size_t r = N; r < ldo; r++) expect(past, (int)r, got[m * ldo + r], 0.0f, -1);
                }
                free(w); free(xb); free(x); free(got); free(want);
            }
}

// to_bf16 against the rule: the nearest bf16, ties to even (the bf16 below or above whose
// distance is smaller, in double); infinities and NaN kept.
static void test_to_bf16(void) {
    for (int i = 0; i < 20000; i++) {
        union { float f; uint32_t u; } v;
        v.u = (uint32_t)irange(0, 0x7FFFFFFF) << 1 | (uint32_t)irange(0, 1);
        if (i < 4) v.u = (uint32_t[]){0x3F808000u, 0x3F818000u, 0x7F7FFFFFu, 0x80000000u}[i]; // ties, overflow, -0
        if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) continue; // NaN: below
        uint16_t got = f32_to_bf16(v.f), down = (uint16_t)(v.u >> 16), up = (uint16_t)(down + 1);
        // (above the largest bf16, "up" is infinity, which IEEE rounding places at 2^128)
        double up_value = (up & 0x7FFF) == 0x7F80 ? copysign(ldexp(1.0, 128), v.f) : bf16_to_f32(up);
        double d_down = fabs((double)bf16_to_f32(down) - v.f), d_up = fabs(up_value - v.f);
        if ((down & 0x7F80) == 0x7F80) { expect("to_bf16 of inf", i, bf16_to_f32(got), v.f, -1); continue; }
        uint16_t want = d_down < d_up || (d_down == d_up && !(down & 1)) ? down : up;
        if (got != want) expect("to_bf16 rounds to nearest even", (int)i, bf16_to_f32(got), bf16_to_f32(want), -1);
        checks++;
    }
    float nan = NAN;
    uint16_t hn = f32_to_bf16(nan);
    expect("to_bf16 of NaN is NaN", 0, isnan(bf16_to_f32(hn)) ? 1.0f : 0.0f, 1.0f, -1);
}

// gemm_quant against its reference: rows that are not whole groups, one and many tokens, K long
// enough to be cut into spans (x86_gemm_quant) with tokens for several passes.
static void test_gemm_quant(void) {
    static const int blocks[] = {1, 2, 3, 5, 33, 70}, rows[] = {1, 3, 16, 17, 40}, tokens[] = {1, 2, 3, 5, 8, 9, 17};
    static const char *names[WEIGHT_NTYPES] = {"f32", "bf16", "q8", "q4", "q6", "q3", "q2"};
    for (int type = WEIGHT_Q8; type < WEIGHT_NTYPES; type++) // q8, q4, q6, q3, q2
        for (int exact = 0; exact < 2; exact++)
            for (size_t bi = 0; bi < sizeof(blocks) / sizeof(blocks[0]); bi++)
                for (size_t ri = 0; ri < sizeof(rows) / sizeof(rows[0]); ri++)
                    for (size_t ti = 0; ti < sizeof(tokens) / sizeof(tokens[0]); ti++) {
                        int K = blocks[bi] * QBLOCK, N = rows[ri], M = tokens[ti], max_shift = type == WEIGHT_Q8 ? 3 : 1;
                        if (K > 1024 && M > 3 && M != 17) continue; // (keeps the run short; 17 tokens: K in spans)
                        size_t ldo = (size_t)N + 3;
                        uint8_t *w = make_matrix(type, N, K, exact, max_shift);
                        QuantX x = make_quantx(M, K, exact ? 5 : 127, exact, max_shift);
                        float *got = calloc((size_t)M * ldo, sizeof(float)), *want = calloc((size_t)M * ldo, sizeof(float));
                        gemm_quant(type, w, K, N, &x, M, got, ldo);
                        ref_gemm_quant(type, w, K, N, &x, M, want, ldo);
                        char what[96];
                        for (int m = 0; m < M; m++) {
                            QuantX xm = quantx_token(&x, m, K);
                            for (int r = 0; r < N; r++) {
                                snprintf(what, sizeof(what), "gemm_quant %s%s K=%d N=%d M=%d m=%d",
                                         names[type], exact ? " exact" : "", K, N, M, m);
                                expect(what, r, got[m * ldo + r], want[m * ldo + r],
                                       exact ? -1 : tolerance(blocks[bi], quant_abs_sum(type, w, K, r, &xm)));
                            }
                            for (size_t r = N; r < ldo; r++) expect("gemm_quant writes past N", (int)r, got[m * ldo + r], 0.0f, -1);
                        }
                        // one token at a time gives the same results, bit for bit (the promise of kernels.h)
                        for (int m = 0; m < M; m += 2) {
                            QuantX xm = quantx_token(&x, m, K);
                            float one[64];
                            gemm_quant(type, w, K, N, &xm, 1, one, 64);
                            for (int r = 0; r < N; r++) expect("gemm_quant one token vs many", r, one[r], got[m * ldo + r], -1);
                        }
                        free(got);
                        free(want);
                        free(w);
                        free_quantx(&x);
                    }
}

static void test_quantize(void) {
    for (int trial = 0; trial < 40; trial++) {
        int nb = irange(1, 40);
        float *x = malloc((size_t)nb * QBLOCK * sizeof(float));
        for (int b = 0; b < nb; b++) {
            float *xb = x + (size_t)b * QBLOCK;
            int kind = irange(0, 4);
            for (int i = 0; i < QBLOCK; i++) {
                switch (kind) {
                case 0: xb[i] = uniform(-3, 3); break;
                case 1: xb[i] = 0.0f; break;                                     // an all-zero block
                case 2: xb[i] = (float)irange(-254, 254) / 2.0f; break;          // ties at max 127: x * 1.0 = k + 0.5
                case 3: xb[i] = uniform(-1e-30f, 1e-30f); break;                 // tiny values
                default: xb[i] = i == 5 ? 1e4f : uniform(-1, 1); break;          // one outlier
                }
            }
            if (kind == 2) xb[0] = 127.0f; // so that 127 / max|x| is 1
        }
        int b0 = irange(0, nb - 1), b1 = irange(b0 + 1, nb);
        QuantX a = make_quantx(1, nb * QBLOCK, 1, 0, 0), r = make_quantx(1, nb * QBLOCK, 1, 0, 0);
        memcpy(r.q, a.q, (size_t)nb * QBLOCK);
        memcpy(r.scale, a.scale, nb * sizeof(float));
        memcpy(r.qoff, a.qoff, 2 * nb * sizeof(int32_t));
        quantize_blocks(&a, x, b0, b1);
        ref_quantize_blocks(&r, x, b0, b1);
        for (int i = 0; i < nb * QBLOCK; i++) expect("quantize_blocks q", i, (float)a.q[i], (float)r.q[i], -1);
        for (int b = 0; b < nb; b++) {
            expect("quantize_blocks scale", b, a.scale[b], r.scale[b], -1);
            expect("quantize_blocks qoff q4", b, (float)a.qoff[2 * b], (float)r.qoff[2 * b], -1);
            expect("quantize_blocks qoff q8", b, (float)a.qoff[2 * b + 1], (float)r.qoff[2 * b + 1], -1);
        }
        free(x);
        free_quantx(&a);
        free_quantx(&r);
    }
}

static void test_swiglu(void) {
    static const int sizes[] = {1, 7, 8, 9, 100, 1001};
    for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
        int n = sizes[si];
        float *h = malloc(n * sizeof(float)), *h2 = malloc(n * sizeof(float)), *r = malloc(n * sizeof(float));
        for (int i = 0; i < n; i++) {
            h[i] = i % 17 == 3 ? uniform(-100, 100) : uniform(-12, 12);
            h2[i] = uniform(-2, 2);
        }
        memcpy(r, h, n * sizeof(float));
        swiglu(h, h2, n);
        ref_swiglu(r, h2, n);
        // e^x within an ulp or two, then a division and a product: 4e-7 relative
        for (int i = 0; i < n; i++) expect("swiglu", i, h[i], r[i], 4e-7 * fabs(r[i]) + 1e-30);
        free(h);
        free(h2);
        free(r);
    }
}

// kv_scores and kv_mix against their references on rows kv_store wrote: every KV type,
// head sizes the kernels take (multiples of 32) and one they leave to the reference (48),
// groups of 1 to 6 queries (a spare lane and a second tile of 4), runs of 1 to 150 rows
// (tails of the tiles and of kv_mix's blocks of 64), rows spaced more than a row apart as the
// chunk's are; a run split in two calls gives the same numbers, bit for bit; kv_rotate is its
// own inverse and keeps the norm.
static void test_kv(void) {
    static const int sizes[] = {32, 48, 64, 128, 256}, groups[] = {1, 2, 3, 4, 6}, runs[] = {1, 3, 5, 64, 150};
    static const char *names[KV_NTYPES] = {"f32", "bf16", "q8", "q4"};
    enum { MAXN = 150, MAXD = 256, MAXG = 6, SPACE = 2 };
    size_t row_max = kv_row_bytes(KV_F32, MAXD) * SPACE;
    uint8_t *rows = malloc(MAXN * row_max);
    float *vals = malloc(sizeof(float) * MAXN * MAXD); // the rows' values
    float q[MAXG * MAXD], att[MAXG * MAXN], want_att[MAXG * MAXN], split_att[MAXG * MAXN];
    float out[MAXG * MAXD], want[MAXG * MAXD], split[MAXG * MAXD];
    for (int type = 0; type < KV_NTYPES; type++)
        for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
            int hd = sizes[si];
            if (type == KV_Q4 && hd % 32) continue; // (q4 rows are blocks of 32)
            for (size_t gi = 0; gi < sizeof(groups) / sizeof(groups[0]); gi++)
                for (size_t ni = 0; ni < sizeof(runs) / sizeof(runs[0]); ni++) {
                    int g = groups[gi], n = runs[ni];
                    size_t stride = kv_row_bytes(type, hd) * (ni % 2 ? SPACE : 1);
                    double abs_q = 0, abs_v = 0;
                    for (int t = 0; t < n; t++) {
                        float x[MAXD];
                        for (int i = 0; i < hd; i++) x[i] = uniform(-2, 2) * (t % 7 == 3 && i == 5 ? 30.0f : 1.0f); // an outlier now and then
                        kv_store(type, x, rows + t * stride, hd);
                        memset(vals + (size_t)t * hd, 0, sizeof(float) * hd);
                        ref_kv_axpy(type, 1.0f, rows + t * stride, vals + (size_t)t * hd, hd);
                    }
                    for (int i = 0; i < g * hd; i++) q[i] = uniform(-1, 1), out[i] = want[i] = split[i] = uniform(-1, 1);
                    for (int i = 0; i < g * n; i++) att[i] = want_att[i] = split_att[i] = -1;
                    char what[96];
                    kv_scores(type, q, g, rows, stride, n, hd, 0.125f, att, n);
                    ref_kv_scores(type, q, g, rows, stride, n, hd, 0.125f, want_att, n);
                    int cut = n / 2; // the run in two calls, as the KV cache's ring and the chunk's rows
                    kv_scores(type, q, g, rows, stride, cut, hd, 0.125f, split_att, n);
                    kv_scores(type, q, g, rows + cut * stride, stride, n - cut, hd, 0.125f, split_att + cut, n);
                    for (int r = 0; r < g; r++)
                        for (int t = 0; t < n; t++) {
                            abs_q = 0;
                            double exact = 0, abs_k = 0, amax = 0;
                            for (int i = 0; i < hd; i++) {
                                abs_q += fabs((double)q[r * hd + i] * vals[(size_t)t * hd + i]);
                                exact += (double)q[r * hd + i] * vals[(size_t)t * hd + i];
                                abs_k += fabs((double)vals[(size_t)t * hd + i]);
                                amax = fmax(amax, fabs((double)q[r * hd + i]));
                            }
                            snprintf(what, sizeof(what), "kv_scores %s hd=%d g=%d n=%d", names[type], hd, g, n);
                            // q8: the kernels' integer sums are the reference's, bit for bit; and the reference
                            // is the exact score but for the query's rounding to int8 (at most half a step a value)
                            expect(what, r * n + t, att[r * n + t], want_att[r * n + t], type == KV_Q8 ? -1 : 0.125 * tolerance(hd, abs_q));
                            if (type == KV_Q8) {
                                snprintf(what, sizeof(what), "ref_kv_scores q8 hd=%d g=%d n=%d against the exact score", hd, g, n);
                                expect(what, r * n + t, want_att[r * n + t], 0.125 * exact,
                                       0.125 * (amax / 127 / 2 * abs_k * (1 + 1e-5) + tolerance(hd, abs_q)));
                            }
                            snprintf(what, sizeof(what), "kv_scores %s hd=%d g=%d n=%d in two calls", names[type], hd, g, n);
                            expect(what, r * n + t, split_att[r * n + t], att[r * n + t], -1);
                        }
                    for (int i = 0; i < g * n; i++) att[i] = uniform(0, 1); // weights, as a softmax gives
                    kv_mix(type, att, n, g, rows, stride, n, hd, out);
                    ref_kv_mix(type, att, n, g, rows, stride, n, hd, want);
                    kv_mix(type, att, n, g, rows, stride, cut, hd, split);
                    kv_mix(type, att + cut, n, g, rows + cut * stride, stride, n - cut, hd, split);
                    for (int r = 0; r < g; r++)
                        for (int i = 0; i < hd; i++) {
                            abs_v = 1;
                            for (int t = 0; t < n; t++) abs_v += fabs((double)att[r * n + t] * vals[(size_t)t * hd + i]);
                            snprintf(what, sizeof(what), "kv_mix %s hd=%d g=%d n=%d", names[type], hd, g, n);
                            expect(what, r * hd + i, out[r * hd + i], want[r * hd + i], tolerance(n, abs_v));
                            snprintf(what, sizeof(what), "kv_mix %s hd=%d g=%d n=%d in two calls", names[type], hd, g, n);
                            expect(what, r * hd + i, split[r * hd + i], out[r * hd + i], -1);
                        }
                }
        }
    for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
        int n = sizes[si];
        float x[MAXD], y[MAXD];
        double norm = 0, back = 0;
        for (int i = 0; i < n; i++) x[i] = y[i] = uniform(-2, 2), norm += (double)x[i] * x[i];
        kv_rotate(y, n);
        for (int i = 0; i < n; i++) back += (double)y[i] * y[i];
        expect("kv_rotate keeps the norm", n, (float)back, (float)norm, 1e-5 * norm);
        kv_rotate(y, n);
        for (int i = 0; i < n; i++) expect("kv_rotate twice", i, y[i], x[i], 1e-5 * (fabs(x[i]) + 1));
    }
    free(rows);
    free(vals);
}

int main(int argc, char **argv) {
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 10) : 1;
    rng_state = seed * 0x9E3779B97F4A7C15ULL + 1;
    test_dot_float();
    test_gemm_quant();
    test_to_bf16();
    test_gemm_bf16(0);
    test_gemm_bf16(1);
    test_quantize();
    test_swiglu();
    test_kv();
    printf("kernels_test (%s): %d checks, %d failed, seed %llu\n", kernels_simd_name, checks, failures,
           (unsigned long long)seed);
    return failures ? 1 : 0;
}
