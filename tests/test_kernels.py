"""
The machine-specific kernels (kernels.c) against the portable references: SIMD against
portable, every x86 build (AVX2, AVX-512 VNNI, emulated where the CPU lacks it), NEON under
qemu (make test-cross), the prefetches kept, and the builds under sanitizers and clang.
"""
from harness import *  # noqa: F401,F403


@test
def simd_matches_portable(tmp):
    """The SIMD kernels (release build) agree with the portable C ones (debug build) in every format.
    Float formats agree to rounding (1e-4). In q8/q4 the int8 activations are rounded from slightly
    different sums, and one flipped rounding step moves a product by 1/127 of an element's share:
    a few of those give differences of order 1e-3, so quantized formats get 0.05."""
    d, cfg, ids, shape = random_model(tmp, 8, 16, 2, dim=128, hidden_dim=192, layers=2, heads=4, kv_heads=2, experts=4, top_k=2)
    worst = {}
    for wtype, tol in (("f32", TOL), ("bf16", TOL), ("q8", 0.05), ("q4", 0.05)):
        model = export(d, os.path.join(tmp, f"{wtype}.bin"), wtype)
        a, ea = engine_logits(model, ids, engine=ENGINE, **shape)
        b, eb = engine_logits(model, ids, engine=DEBUG_ENGINE, **shape)
        compare_experts(ea, eb, f"{wtype} SIMD vs portable")
        err = float(np.abs(a - b).max())
        check(err <= tol, f"{wtype} SIMD vs portable: max abs difference {err:.3g} > {tol}")
        worst[wtype] = err
    return ", ".join(f"{k} {v:.1g}" for k, v in worst.items())


@test
def kernels_match_reference(tmp):
    """Every SIMD kernel against its portable reference, directly (tests/kernels_test.c: random data with
    odd sizes, bit for bit where the arithmetic is exact, within float rounding elsewhere), for every
    kernel build this machine can run: this build's flags, the portable C build, and on x86-64 AVX2
    and AVX-512 VNNI (emulated where the CPU lacks it). NEON: make test-cross."""
    test_src = os.path.join(HERE, "kernels_test.c")
    builds = [("native (-march=native)", ["-march=native"], os.path.join(ROOT, "kernels.c"), set()),
              ("portable", [], os.path.join(ROOT, "kernels.c"), set())]
    notes = []
    if platform.machine() in ("x86_64", "AMD64"):
        have = cpu_flags()
        x86 = x86_builds()
        if not any("emulated" in b[0] for b in x86):  # the emulation too, so it is kept complete everywhere
            x86.append(("avx512-vnni (emulated)", AVX2 + ["-I" + HERE], os.path.join(HERE, "avx512_emulated.c"),
                        {"avx2", "fma", "f16c"}))
        for name, flags, src, needs in x86:
            if not needs <= have:
                notes.append(f"{name} not run (the CPU lacks {' '.join(sorted(needs - have))})")
                continue
            builds.append((name, flags, src, needs))
    else:
        notes.append("x86-64 builds not run on " + platform.machine())
    ran = []
    for name, flags, src, _ in builds:
        exe = os.path.join(tmp, "kernels_test")
        r = run([CC, "-O2", *flags, *BUILD_FLAGS, "-o", exe, test_src, src, "-lm"])
        check(r.returncode == 0, f"kernels_test build {name} failed:\n{r.stderr}")
        r = run([exe, str(stable_seed(name))])
        check(r.returncode == 0, f"{name}: kernels differ from the reference:\n{r.stderr}{r.stdout}")
        path = name.split()[0]
        check(path in ("native", "portable") or f"({path})" in r.stdout,
              f"the {name} build compiled another path: {r.stdout.strip()}")
        ran.append(f"{name}: {r.stdout.split(': ', 1)[1].split(',')[0]}")
    return "; ".join(ran + notes)


@test
def avx512_identical_to_avx2(tmp):
    """Whole-model logits of the AVX-512 VNNI build equal the AVX2 build's bit for bit (the same
    integer sums, the same float operations lane by lane), q8, q4, q3 and q2, prompts and decoding.
    Real AVX-512 where the CPU has it, else emulated (tests/avx512_emulation.h); the real
    build also always compiles."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise Skip("the AVX-512 code is for x86-64 and this machine is " + platform.machine())
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        raise Skip("this CPU has no AVX2, which the x86 kernel builds need")
    for flags in (AVX512VNNI, ["-march=sapphirerapids"], ["-march=znver3"]):
        r = run([CC, "-O2", *flags, *BUILD_FLAGS, "-c", "-o", os.path.join(tmp, "k.o"), os.path.join(ROOT, "kernels.c")])
        check(r.returncode == 0, f"build with {' '.join(flags)} failed:\n{r.stderr}")
    d, cfg, ids, shape = random_model(tmp, 41, 12, 7, dim=192, hidden_dim=256, layers=2, heads=4, kv_heads=2, experts=4, top_k=2)
    models = {w: export(d, os.path.join(tmp, f"{w}.bin"), w) for w in ("q8", "q4", "q3", "q2")}
    exes = {}
    for name, flags, src, _ in x86_builds():
        exe = os.path.join(tmp, "mixtral-" + name.split()[0])
        others = [f for f in SOURCES if not f.endswith("kernels.c")]
        r = run([CC, "-O2", *flags, *BUILD_FLAGS, "-o", exe, src, *others, "-lm", "-lpthread"])
        check(r.returncode == 0, f"{name} build failed:\n{r.stderr}")
        exes[name] = exe
    base = exes.pop("avx2")
    for name, exe in exes.items():
        for wtype, model in models.items():
            for chunk in (None, 1):  # tiles of several tokens, and one token at a time (dot products)
                a, ea = engine_logits(model, ids, engine=base, chunk=chunk, **shape)
                b, eb = engine_logits(model, ids, engine=exe, chunk=chunk, **shape)
                what = f"{name} {wtype} chunk {chunk or 'default'}"
                compare_experts(eb, ea, what)
                if not np.array_equal(a, b):
                    p, v = np.argwhere(a != b)[0]
                    raise Failure(f"{what}: logits differ from the AVX2 build, first at position {p} token {v}: "
                                  f"{b[p, v]!r} vs {a[p, v]!r} (max {float(np.abs(a - b).max()):.3g})")
    return ", ".join(exes) + ": identical to AVX2, q8, q4, q3 and q2, prompts and decoding"


@test
def kernels_keep_their_prefetches(tmp):
    """The quantized kernels prefetch their weight stream (kernels.c); a compiler once dropped
    every one of those prefetches without a word (decoding ran 15% slower). Each x86 kernel build
    (AVX2, AVX-512 VNNI) must hold prefetch instructions in gemm_quant's code."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise Skip("the software prefetches are x86 code and this machine is " + platform.machine())
    objdump = shutil.which("objdump")
    if not objdump:
        raise Skip("objdump is missing (binutils)")
    counts = []
    for name, flags in (("avx2", AVX2), ("avx512-vnni", AVX512VNNI)):
        obj = os.path.join(tmp, name + ".o")
        r = run([CC, "-O3", *flags, *BUILD_FLAGS, "-c", os.path.join(ROOT, "kernels.c"), "-o", obj])
        check(r.returncode == 0, f"{name}: build failed:\n{r.stderr}")
        asm = run([objdump, "-d", "--no-show-raw-insn", obj]).stdout
        body = asm[asm.find("<x86_gemm_quant>:"):]
        body = body[:body.find("\n\n")]
        n = len(re.findall(r"\bprefetcht[01]\b", body))
        check(n >= 8, f"{name}: x86_gemm_quant holds {n} prefetch instructions (its q8 and q4 loops prefetch)")
        counts.append(f"{name} {n}")
    return "prefetches in x86_gemm_quant: " + ", ".join(counts)


@cross_test
def neon_kernels_under_qemu(tmp):
    """The NEON kernels, cross-compiled for aarch64 (plain, and with dot-product instructions)
    and run under qemu: directly against the portable references (tests/kernels_test.c), and whole
    models against this machine's build: 1e-4 for float formats, and for q8/q4 the 0.05 of
    simd_matches_portable; identical experts."""
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not cc or not qemu:
        raise Skip("aarch64-linux-gnu-gcc or qemu-aarch64 is missing (make test-cross installs them with apt)")
    d, cfg, ids, shape = random_model(tmp, 31, 10, 6, dim=128, hidden_dim=192, layers=2, heads=4, kv_heads=2, experts=4, top_k=2)
    worst = 0.0
    for arch in ("armv8-a", "armv8.2-a+dotprod"):
        exe = os.path.join(tmp, "mixtral-" + arch.replace("+", "-"))
        r = run([cc, "-O2", "-march=" + arch, "-Wall", "-Wextra", "-Werror", "-std=c11", "-D_GNU_SOURCE", "-static",
                 "-o", exe, *SOURCES, "-lm", "-lpthread"])
        check(r.returncode == 0, f"cross build for {arch} failed:\n{r.stderr}")
        # the kernels directly against their references (tests/kernels_test.c)
        kt = exe + "-kernels_test"
        r = run([cc, "-O2", "-march=" + arch, *BUILD_FLAGS, "-static", "-o", kt, os.path.join(HERE, "kernels_test.c"),
                 os.path.join(ROOT, "kernels.c"), "-lm"])
        check(r.returncode == 0, f"kernels_test cross build for {arch} failed:\n{r.stderr}")
        r = run([qemu, kt, str(stable_seed(arch))])
        check(r.returncode == 0, f"{arch}: NEON kernels differ from the reference:\n{r.stderr}{r.stdout}")
        wrapper = exe + ".sh"
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {qemu} {exe} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        for wtype, tol, kv in (("f32", TOL, "f32"), ("bf16", TOL, "f32"), ("q8", 0.05, "f32"), ("q4", 0.05, "f32"),
                               ("q3", 0.05, "f32"), ("q2", 0.05, "f32"), ("q8", 0.05, "q8"), ("q8", 0.05, "q4")):
            model = os.path.join(tmp, f"{wtype}.bin")
            if not os.path.exists(model):
                export(d, model, wtype)
            a, ea = engine_logits(model, ids, extra=("--kv", kv), **shape)
            b, eb = engine_logits(model, ids, engine=wrapper, extra=("--kv", kv), **shape)
            compare_experts(eb, ea, f"{arch} {wtype}")
            err = float(np.abs(a - b).max())
            check(err <= tol, f"{arch} {wtype}: NEON differs from this machine's build by {err:.3g} > {tol}")
            worst = max(worst, err)
    return (f"armv8-a and armv8.2-a+dotprod: kernels match the references; all weight formats and KV types; "
            f"largest difference {worst:.2g}")


@test
def native_kernels_under_sanitizers(tmp):
    """The fastest kernels this machine has (-march=native: the ones make builds, with their
    per-thread buffers), under AddressSanitizer, LeakSanitizer and UBSan: chunked prompts and
    decoding on 3 threads in q8 and q4, with the same logits as the release build."""
    exe = os.path.join(tmp, "mixtral-native-asan")
    r = run([CC, "-O1", "-g", "-march=native", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
             *BUILD_FLAGS, "-o", exe, *SOURCES, "-lm", "-lpthread"])
    check(r.returncode == 0, f"native sanitizer build failed:\n{r.stderr}")
    d, cfg, ids, shape = random_model(tmp, 41, 21, 7, dim=128, hidden_dim=256, layers=2, heads=4, kv_heads=2,
                                      experts=4, top_k=2)
    for wtype in ("q8", "q4"):
        model = export(d, os.path.join(tmp, f"{wtype}.bin"), wtype)
        want, _ = engine_logits(model, ids, **shape)
        got, _ = engine_logits(model, ids, engine=exe, threads=3, **shape)
        check(np.array_equal(got, want), f"{wtype}: the sanitizer build's logits differ from the release build's")
        r = run([exe, model, "-i", "Hello there, how are you", "-n", "6", "-t", "0", "--threads", "3"])
        sanitized_ok(r, f"{wtype}: native sanitizer build")
    return "q8, q4: clean, logits identical to the release build"


@test
def builds_with_clang(tmp):
    """The Makefile's `make CC=clang` (its -Werror included) builds the engine with this machine's
    kernels, and the build gives the gcc build's logits to rounding (clang fuses a * b + c in
    plain C where gcc -std=c11 does not: 1e-6 apart, within the 1e-4 of the float formats)."""
    clang = shutil.which("clang")
    if not clang:
        raise Skip("clang is not installed")
    exe = os.path.join(tmp, "mixtral-clang")
    r = run([clang, "-O3", "-march=native", *BUILD_FLAGS, "-o", exe, *SOURCES, "-lm", "-lpthread"])
    check(r.returncode == 0, f"clang build failed:\n{r.stderr}")
    d, cfg, ids, shape = random_model(tmp, 43, 12, 8, dim=64, hidden_dim=128, layers=1, heads=4, kv_heads=2,
                                      experts=4, top_k=2)
    worst = 0.0
    for wtype in ("q8", "q4"):
        model = export(d, os.path.join(tmp, f"{wtype}.bin"), wtype)
        want, _ = engine_logits(model, ids, **shape)
        got, _ = engine_logits(model, ids, engine=exe, **shape)
        err = float(np.abs(got - want).max())
        check(err <= TOL, f"{wtype}: the clang build's logits differ from gcc's by up to {err:.3g}")
        worst = max(worst, err)
    return f"clang build: logits within {worst:.1g} of gcc's in q8 and q4"


@cross_test
def macos_builds(tmp):
    """The program compiles and links for macOS on Apple silicon and on Intel (zig cc 0.11 with the
    macOS SDK headers, installed from npm by tests/deps.sh --cross), warnings as errors: the Mac's
    code paths (sysctl and Mach for memory and performance cores, F_NOCACHE) are compiled there."""
    zig = os.path.join(ROOT, ".cache", "zig", "node_modules", "@ryoppippi", "zig-linux-x64", "zig")
    if not os.path.exists(zig):
        raise Skip("no zig: make test-cross installs it (tests/deps.sh --cross)")
    built = []
    for target, flags in (("aarch64-macos", ["-mcpu=apple_m1"]), ("x86_64-macos", ["-mavx2", "-mfma", "-mf16c"])):
        exe = os.path.join(tmp, f"mixtral-{target}")
        r = run([zig, "cc", "-target", target, "-O2", *flags, *BUILD_FLAGS, "-o", exe, *SOURCES, "-lm", "-lpthread"])
        check(r.returncode == 0 and os.path.getsize(exe) > 0, f"{target}:\n{r.stderr[-2000:]}")
        r = run(["file", exe]) if shutil.which("file") else None
        built.append(target + (f" ({r.stdout.split(':', 1)[1].strip()[:40]})" if r and r.returncode == 0 else ""))
    return "built " + ", ".join(built)
