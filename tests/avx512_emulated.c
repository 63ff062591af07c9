// mixtral.c with its AVX-512 code paths, on a machine without AVX-512: the
// AVX-512 instructions it uses come from tests/avx512_emulation.h, the rest
// is the AVX2 build. Built and compared with the real AVX2 build by
// tests/run_tests.py (avx512_kernels_emulated); -DEMULATE_VNNI for VNNI.
#include <immintrin.h>
#include "avx512_emulation.h"
#include "../mixtral.c"
