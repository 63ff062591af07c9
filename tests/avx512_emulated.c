// kernels.c with its AVX-512 code paths, on a machine without AVX-512: the
// AVX-512 instructions it uses come from tests/avx512_emulation.h, the rest
// is the AVX2 build. Linked in place of kernels.c by tests/run_tests.py
// (kernels_match_reference, avx512_identical_to_avx2); -DEMULATE_VNNI for VNNI.
#include <immintrin.h>
#include "avx512_emulation.h"
#include "../kernels.c"
