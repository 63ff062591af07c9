#!/usr/bin/env python3
"""
The test suite (make test). Every check compares mixtral.c against something
independent: tests/reference.py (a numpy forward pass from the math) for
logits and expert choices, the sentencepiece library for the tokenizer, and
expectations about errors for bad input. Prints the first differences on a
mismatch; ends with 'N passed, N failed, N skipped' and exits non-zero if
anything failed. A test that needs a tool this machine lacks is skipped with
its reason, never failed for it. Tests of other architectures under emulation
(cross tests) run with --cross, which `make test-cross` gives after installing
their toolchain.

    python3 tests/run_tests.py [-k SUBSTRING] [--cross]

The tests live one file a feature (tests/test_*.py, in the order below), on the
harness of tests/harness.py.
"""
import argparse
import os
import shutil
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import DEBUG_ENGINE, ENGINE, TESTS, Failure, Skip, compare_tokenizer  # noqa: E402

FEATURES = ("test_engine", "test_kernels", "test_formats", "test_tokenizer_chat", "test_cli", "test_bad_input",
            "test_expert_cache", "test_kv_cache")
for feature in FEATURES:
    __import__(feature)


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default="", help="run only tests whose name contains this")
    ap.add_argument("--cross", action="store_true", help="run the cross tests (make test-cross) instead of the others")
    a = ap.parse_args()
    for exe in (ENGINE, DEBUG_ENGINE, compare_tokenizer.TOK_BATCH):
        if not os.path.exists(exe):
            sys.exit(f"run_tests.py: {exe} is missing; run 'make test', which builds it")
    passed = failed = skipped = 0
    for t in TESTS:
        if a.k not in t.__name__:
            continue
        if getattr(t, "cross", False) != a.cross:
            if not a.cross:
                skipped += 1
                print(f"SKIP {t.__name__}: a cross test; make test-cross runs it", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="mixtral_test_") as tmp:
            try:
                detail = t(tmp)
                passed += 1
                print(f"PASS {t.__name__}: {detail or ''}", flush=True)
            except Skip as e:
                skipped += 1
                print(f"SKIP {t.__name__}: {e}", flush=True)
            except Failure as e:
                failed += 1
                print(f"FAIL {t.__name__}: {e}", flush=True)
            except Exception:
                failed += 1
                print(f"FAIL {t.__name__}: unexpected exception\n{traceback.format_exc()}", flush=True)
    for base in [harness.SMALL.get("base")] + [b for b, _ in harness.TOK_MODELS.values()]:
        if base:
            shutil.rmtree(base, ignore_errors=True)
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    sys.exit(1 if failed or not passed else 0)


if __name__ == "__main__":
    main()
