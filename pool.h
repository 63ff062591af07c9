// pool.h: a small thread pool. Persistent workers; the calling thread is
// worker 0, so n threads means n-1 pthreads. A job is a function called as
// fn(arg, tid, n) on every worker, which takes a share of the work:
//   - a fixed share by tid (split_range),
//   - its own contiguous share with stealing at the end (pool_share and
//     pool_next_block, for decoding, which streams weights from memory),
//   - or the next free piece from a counter of the job's own (batches).
// Every output element must be computed by exactly one worker, with the same
// arithmetic whichever worker it is, so that results depend neither on timing
// nor on the thread count.
#ifndef POOL_H
#define POOL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

typedef void (*PoolFn)(void *arg, int tid, int n);

// A worker's share of a job's blocks, [front, back) in one atomic word (pool_share)
struct Share { _Alignas(64) _Atomic uint64_t span; }; // front << 32 | back

typedef struct {
    int n;                      // threads, the caller included
    int spin;                   // polls before sleeping: none when there are more threads than CPUs
    pthread_t *threads;         // (n-1,)
    PoolFn fn;                  // the current job, published by the release store to round
    void *arg;
    _Alignas(64) _Atomic uint64_t round; // bumped once per job; workers wait for a new value
    _Alignas(64) _Atomic int pending;    // workers still running this round
    _Alignas(64) pthread_mutex_t mu;     // guards the sleeping counts and the condition variables
    pthread_cond_t wake, done;
    int sleepers;               // workers asleep on `wake`
    int caller_asleep;          // the caller asleep on `done`
    _Atomic int quit;           // set before the last bump of round: workers exit
    struct Share *shares;       // (n,) one per worker
} ThreadPool;

// The CPUs this process may run on: its affinity mask (taskset, containers).
int pool_usable_cpus(void);
// The threads to run by default: on a hybrid x86 CPU whose performance cores
// Linux lists (/sys/devices/cpu_core/cpus), those of them this process may use;
// else pool_usable_cpus().
int pool_default_threads(void);
// Starts n-1 workers, with every signal blocked (the caller's thread takes them). Returns 0, or -1 if memory or a thread could not be had.
int pool_init(ThreadPool *pool, int n);
// Runs fn(arg, tid, n) on all n threads and returns when every one has finished.
void pool_run(ThreadPool *pool, PoolFn fn, void *arg);
void pool_free(ThreadPool *pool);

// The share [*start, *end) of `total` items that worker tid of n takes.
void split_range(int total, int tid, int n, int *start, int *end);
// Deals `blocks` items out as n contiguous shares; call before pool_run.
void pool_share(ThreadPool *pool, int64_t blocks);
// The next block for worker tid: from its own share, else stolen; -1: all taken.
int64_t pool_next_block(ThreadPool *pool, int tid);

#endif
