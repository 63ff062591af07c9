// util.c: see util.h.
#include "util.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifdef __APPLE__ // the few facts a Mac gives through sysctl and Mach instead of /proc
#include <mach/mach.h>
#include <sys/sysctl.h>
#endif

#ifdef MIXTRAL_FUZZ
jmp_buf die_jump;
#endif

void die(const char *fmt, ...) {
#ifdef MIXTRAL_FUZZ
    (void)fmt;
    longjmp(die_jump, 1);
#else
    va_list ap;
    va_start(ap, fmt);
    fputs("mixtral: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
#endif
}

void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) die("out of memory allocating %zu x %zu bytes (try a smaller -c)", n, size);
    return p;
}

char *read_file(const char *path, size_t *len) {
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = xcalloc(cap, 1);
    for (;;) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        cap *= 2;
        if (!(buf = realloc(buf, cap))) die("out of memory reading %s", path);
    }
    if (ferror(f)) die("cannot read %s: %s", path, strerror(errno));
    if (f != stdin) fclose(f);
    *len = n;
    return buf;
}

int64_t read_at(int fd, void *buf, uint64_t bytes, uint64_t offset) {
    uint64_t got = 0;
    while (got < bytes) {
        ssize_t r = pread(fd, (uint8_t *)buf + got, bytes - got, (off_t)(offset + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -(int64_t)errno;
        if (r == 0) break;
        got += (uint64_t)r;
    }
    return (int64_t)got;
}

const char *read_error(int64_t r) { return r < 0 ? strerror((int)-r) : "the file ended early"; }

void *anon_alloc(uint64_t bytes, size_t *alloc_bytes) {
    size_t n = (size_t)round_up(bytes ? bytes : 1, 2u << 20);
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, n, MADV_HUGEPAGE);
#endif
    *alloc_bytes = n;
    return p;
}

void anon_free(void *p, size_t alloc_bytes) {
    if (p) munmap(p, alloc_bytes);
}

double time_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int stderr_is_tty(void) { return isatty(fileno(stderr)); }

uint64_t proc_number(const char *path, const char *format) {
    FILE *f = fopen(path, "r");
    char line[256];
    unsigned long long v = 0;
    while (f && fgets(line, sizeof(line), f))
        if (sscanf(line, format, &v) == 1) break;
    if (f) fclose(f);
    return v;
}

uint64_t available_memory(void) {
#ifdef __APPLE__
    // free and inactive pages (what macOS would give without swapping)
    vm_statistics64_data_t vm;
    mach_msg_type_number_t count = HOST_VM_INFO64_COUNT;
    vm_size_t page = 0;
    if (host_page_size(mach_host_self(), &page) != KERN_SUCCESS ||
        host_statistics64(mach_host_self(), HOST_VM_INFO64, (host_info64_t)&vm, &count) != KERN_SUCCESS)
        return 0;
    return ((uint64_t)vm.free_count + vm.inactive_count) * page;
#else
    return proc_number("/proc/meminfo", "MemAvailable: %llu kB") * 1024;
#endif
}

int performance_cores(void) {
#ifdef __APPLE__
    int n = 0;
    size_t len = sizeof(n);
    if (sysctlbyname("hw.perflevel0.logicalcpu", &n, &len, NULL, 0) == 0 && n > 0) return n; // Apple silicon
#endif
    return 0;
}
