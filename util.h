// util.h: the few things every part of the program needs: one way out on bad
// input (die), memory that cannot fail silently, whole-file and whole-range
// reads, anonymous memory in huge pages, the clock, and numbers the system
// publishes (Linux /proc). Nothing here knows about models.
#ifndef UTIL_H
#define UTIL_H

#include <stddef.h>
#include <stdint.h>

#ifdef MIXTRAL_FUZZ
#include <setjmp.h>
extern jmp_buf die_jump; // the fuzz targets (tests/fuzz) take every die() back here
#endif

// Says what was wrong and what to do ("mixtral: error: ..." on stderr), exits 1.
void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
// calloc that dies instead of returning NULL (and never asks for 0 bytes).
void *xcalloc(size_t n, size_t size);
// A whole file ("-": standard input) in a malloc'd buffer; *len its bytes.
char *read_file(const char *path, size_t *len);
// Reads `bytes` at `offset` of fd into buf, going on after short reads and
// EINTR, until done or the file ends. Returns the bytes read (fewer: the file
// ended), or -errno of a failed read. read_error() says which, for a message.
int64_t read_at(int fd, void *buf, uint64_t bytes, uint64_t offset);
const char *read_error(int64_t r); // "the file ended early" or strerror(-r)
// Zeroed anonymous memory of at least `bytes` (a multiple of 2 MB), in 2 MB
// pages where the kernel allows: weights streamed from 4 KB pages miss the TLB
// every page. NULL on failure; *alloc_bytes gets what to give anon_free.
void *anon_alloc(uint64_t bytes, size_t *alloc_bytes);
void anon_free(void *p, size_t alloc_bytes);
// n rounded up to a multiple of `to`.
static inline uint64_t round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }
double time_s(void); // a monotonic clock, in seconds
int stderr_is_tty(void);
// The number on the line of a /proc file that `format` (sscanf, one %llu)
// matches; 0 where there is none (or no /proc).
uint64_t proc_number(const char *path, const char *format);
// Memory the system could give this process now without swapping (Linux:
// MemAvailable, counting the page cache it can drop; macOS: free and inactive
// pages); 0 if unknown.
uint64_t available_memory(void);
// The performance cores a Mac reports (hw.perflevel0.logicalcpu); 0 elsewhere.
int performance_cores(void);

#endif
