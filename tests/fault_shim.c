// fault_shim.c: faults injected into the reads of one file, for the tests
// (tests/test_bad_input.py, reads_with_faults). Loaded with LD_PRELOAD; set by
// the environment of the process under test (the test's, not the program's):
//   FAULT_FILE   the file whose reads are touched (a path suffix)
//   FAULT_KIND   error: the FAULT_AT-th read fails with EIO
//                short: every read returns at most half of what was asked
//                eintr: every other read fails with EINTR first
//   FAULT_AT     which read fails (1 = the first), for error
// pread, pread64 and read are intercepted (Python's file objects use read).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static atomic_long calls;

// Whether fd is the file under test.
static int targeted(int fd) {
    const char *want = getenv("FAULT_FILE");
    char link[64], path[PATH_MAX];
    if (!want) return 0;
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof(path) - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    size_t lw = strlen(want);
    return (size_t)n >= lw && !strcmp(path + n - lw, want);
}

// How much of `count` to ask the real call for, or -1 with errno set: the fault.
static long fault(int fd, size_t count) {
    if (!targeted(fd)) return (long)count;
    long k = atomic_fetch_add(&calls, 1) + 1;
    const char *kind = getenv("FAULT_KIND");
    if (!kind) return (long)count;
    if (!strcmp(kind, "error") && k == atol(getenv("FAULT_AT") ? getenv("FAULT_AT") : "1")) { errno = EIO; return -1; }
    if (!strcmp(kind, "short") && count > 1) return (long)(count / 2);
    if (!strcmp(kind, "eintr") && k % 2) { errno = EINTR; return -1; }
    return (long)count;
}

ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = (ssize_t (*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread");
    long n = fault(fd, count);
    return n < 0 ? -1 : real(fd, buf, (size_t)n, offset);
}

ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = (ssize_t (*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread64");
    long n = fault(fd, count);
    return n < 0 ? -1 : real(fd, buf, (size_t)n, offset);
}

ssize_t read(int fd, void *buf, size_t count) {
    static ssize_t (*real)(int, void *, size_t);
    if (!real) real = (ssize_t (*)(int, void *, size_t))dlsym(RTLD_NEXT, "read");
    long n = fault(fd, count);
    return n < 0 ? -1 : real(fd, buf, (size_t)n);
}
