// expert_cache.c: see expert_cache.h. Slots, their owners and the queue of
// reads are guarded by one mutex; the I/O threads take pieces off the queue.
#include "expert_cache.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

#define IO_THREADS 4
#define PIECE (4u << 20) // bytes per pread
#define BLOCK 4096       // O_DIRECT: offsets, lengths and buffers in whole blocks

// One queued read: `bytes` at file_offset into the slot at slot_offset, of
// which `need` lie before the file ends (the last block's tail does not).
typedef struct { int slot; uint64_t file_offset, slot_offset, bytes, need; } ReadPiece;

struct ExpertCache {
    char *path;                // the model file, for messages
    int fd;                    // the model file
    int direct_fd;             // the same, opened with O_DIRECT, or -1 (then reads go through fd)
    uint64_t file_size;
    int n_layers, n_experts;
    uint64_t *span;            // (L*E) file offset of expert (l, e)'s span; it lies
                               // in its slot at span % BLOCK, as reads start at a block
    uint64_t span_bytes;       // the same for every expert
    int n_slots;
    size_t slot_bytes;
    uint64_t memory;           // what it was given
    uint8_t *slots;            // (n_slots, slot_bytes)
    size_t slots_alloc;        // anon_alloc's size of slots
    int *slot_of;              // (L*E) the slot holding (or reading) expert (l, e), or -1
    int *owner;                // (n_slots) the expert l*E+e in the slot, or -1
    uint64_t *last_use;        // (n_slots) the LRU clock when it was last used or read ahead
    uint64_t clock;
    int by_usage;              // EXPERT_CACHE_USAGE: evict the expert used least often lately
    float *uses;               // (L*E) uses of each expert, halved every USES_HALF_LIFE lookups
    uint8_t *pinned;           // (n_slots) in use by the layer being computed
    int *pending;              // (n_slots) pieces of its read not yet done (under mu); 0: ready
    uint8_t *guessed;          // (L*E) read ahead for its layer, not yet needed there
    // the I/O threads and their queue of pieces
    pthread_t io[IO_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    ReadPiece *queue;          // a ring of q_cap pieces
    int q_head, q_n, q_cap, quit, failed;
    int64_t read_result;       // why a read failed (read_at's result)
    uint64_t failed_at;        // and where
    int in_flight;             // pieces queued or being read
    double busy_since;         // when the reads in flight began
    ExpertCacheReport stats;
};

static void *io_thread(void *arg) {
    ExpertCache *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->quit && c->q_n == 0) pthread_cond_wait(&c->work, &c->mu);
        if (c->quit) break;
        ReadPiece p = c->queue[c->q_head];
        c->q_head = (c->q_head + 1) % c->q_cap;
        c->q_n--;
        pthread_mutex_unlock(&c->mu);
        uint8_t *to = c->slots + (size_t)p.slot * c->slot_bytes + p.slot_offset;
        int fd = c->direct_fd >= 0 ? c->direct_fd : c->fd;
        int64_t got = read_at(fd, to, p.bytes, p.file_offset);
        if (got == -EINVAL && fd != c->fd) got = read_at(c->fd, to, p.bytes, p.file_offset); // O_DIRECT refused here
        pthread_mutex_lock(&c->mu);
        if (got < (int64_t)p.need && !c->failed) { c->failed = 1; c->read_result = got; c->failed_at = p.file_offset; }
        if (got > 0) c->stats.file_bytes += (uint64_t)got;
        c->pending[p.slot]--;
        if (--c->in_flight == 0) c->stats.read_seconds += time_s() - c->busy_since;
        pthread_cond_broadcast(&c->done);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

// Queues the read of expert x = l*E+e into slot s (under mu).
static void read_expert(ExpertCache *c, int x, int s) {
    if (c->owner[s] >= 0) c->slot_of[c->owner[s]] = -1;
    c->owner[s] = x;
    c->slot_of[x] = s;
    // whole blocks around the span: from the block it starts in to the end of the block it ends in
    uint64_t from = c->span[x] / BLOCK * BLOCK, bytes = round_up(c->span[x] + c->span_bytes, BLOCK) - from;
    for (uint64_t off = 0; off < bytes; off += PIECE) {
        if (c->q_n == c->q_cap) die("expert cache: read queue full"); // sized for every slot at once
        uint64_t n = bytes - off < PIECE ? bytes - off : PIECE, at = from + off;
        uint64_t need = at + n <= c->file_size ? n : c->file_size - at;
        c->queue[(c->q_head + c->q_n++) % c->q_cap] = (ReadPiece){s, at, off, n, need};
        c->pending[s]++;
        if (c->in_flight++ == 0) c->busy_since = time_s();
    }
    pthread_cond_broadcast(&c->work);
}

static void read_failed(const ExpertCache *c) {
    die("expert cache: cannot read %s at offset %llu: %s (has the model file changed while in use?)", c->path,
        (unsigned long long)c->failed_at, read_error(c->read_result));
}

// Recent uses of the expert in slot s (-1: the slot is empty).
static float slot_uses(const ExpertCache *c, int s) { return c->owner[s] < 0 ? -1.0f : c->uses[c->owner[s]]; }

// The slot to read into, of those neither in use nor being read, or -1: the
// least recently used, or by usage the least used lately (then the least recent).
static int victim(const ExpertCache *c) {
    int best = -1;
    for (int s = 0; s < c->n_slots; s++) {
        if (c->pinned[s] || c->pending[s] > 0) continue;
        if (best < 0) { best = s; continue; }
        float us = slot_uses(c, s), ub = slot_uses(c, best);
        if (c->by_usage && us != ub) { if (us < ub) best = s; }
        else if (c->last_use[s] < c->last_use[best]) best = s;
    }
    return best;
}

// Counts a use of expert x, for the usage policy: counts halve every
// USES_HALF_LIFE lookups, so the cache follows a change of topic.
#define USES_HALF_LIFE 1024
static void count_use(ExpertCache *c, int x) {
    c->uses[x] += 1.0f;
    if ((c->stats.hits + c->stats.misses) % USES_HALF_LIFE == 0)
        for (int i = 0; i < c->n_layers * c->n_experts; i++) c->uses[i] *= 0.5f;
}

// Reads ahead experts es[0..n) of layer l, into slots no one is using (under mu).
static void read_ahead(ExpertCache *c, int l, const int *es, int n) {
    for (int i = 0; i < n; i++) {
        int x = l * c->n_experts + es[i];
        if (c->slot_of[x] >= 0) continue; // there, or on its way
        int s = victim(c);
        if (s < 0) break;
        c->guessed[x] = 1;
        c->stats.prefetched++;
        c->last_use[s] = ++c->clock; // as if used: not the next victim
        read_expert(c, x, s);
    }
}

int expert_cache_acquire(ExpertCache *c, int l, const int *es, int n, const uint8_t **at, const int *ahead, int n_ahead) {
    int E = c->n_experts;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < n; i++) { // what is there already is not a victim for what is not
        int s = c->slot_of[l * E + es[i]];
        if (s >= 0) c->pinned[s] = 1;
    }
    int got = 0;
    for (; got < n; got++) {
        int x = l * E + es[got], s = c->slot_of[x];
        if (s >= 0) {
            c->stats.hits++;
        } else {
            if ((s = victim(c)) < 0 && got > 0) break; // the rest in a later wave
            if (s < 0) { // none free for the first: the protected ones are for later waves, or reads are in flight
                for (int i = 1; i < n; i++) {
                    int t = c->slot_of[l * E + es[i]];
                    if (t >= 0) c->pinned[t] = 0;
                }
                while ((s = victim(c)) < 0 && !c->failed) pthread_cond_wait(&c->done, &c->mu);
                if (c->failed) read_failed(c);
            }
            c->stats.misses++;
            read_expert(c, x, s);
        }
        if (c->guessed[x]) { c->stats.prefetch_used++; c->guessed[x] = 0; }
        count_use(c, x);
        c->pinned[s] = 1;
        c->last_use[s] = ++c->clock;
    }
    for (int i = got; i < n; i++) { // those for a later wave: unpinned again
        int s = c->slot_of[l * E + es[i]];
        if (s >= 0) c->pinned[s] = 0;
    }
    for (int e = 0; e < E; e++) c->guessed[l * E + e] = 0; // the guesses for l are settled
    if (n_ahead && l + 1 < c->n_layers) read_ahead(c, l + 1, ahead, n_ahead); // after this layer's reads
    double t0 = time_s();
    for (int i = 0; i < got; i++)
        while (c->pending[c->slot_of[l * E + es[i]]] > 0 && !c->failed) pthread_cond_wait(&c->done, &c->mu);
    c->stats.wait_seconds += time_s() - t0;
    if (c->failed) read_failed(c);
    for (int i = 0; i < got; i++) {
        int x = l * E + es[i];
        at[i] = c->slots + (size_t)c->slot_of[x] * c->slot_bytes + c->span[x] % BLOCK;
    }
    pthread_mutex_unlock(&c->mu);
    return got;
}

void expert_cache_release(ExpertCache *c, int l, const int *es, int n) {
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < n; i++) c->pinned[c->slot_of[l * c->n_experts + es[i]]] = 0;
    pthread_mutex_unlock(&c->mu);
}

void expert_cache_read(ExpertCache *c, uint64_t offset, uint64_t bytes, void *buf) {
    int64_t r = read_at(c->fd, buf, bytes, offset);
    if (r != (int64_t)bytes)
        die("cannot read %s at offset %llu: %s (has the model file changed while in use?)", c->path, (unsigned long long)offset,
            read_error(r));
}

uint64_t expert_cache_slot_bytes(const ExpertLayout *layout) { return round_up(layout->span_bytes + BLOCK, BLOCK); }

ExpertCache *expert_cache_open(const char *path, int fd, uint64_t file_size, const ExpertLayout *layout,
                               uint64_t memory, int policy) {
    int L = layout->n_layers, E = layout->n_experts;
    uint64_t slot_bytes = expert_cache_slot_bytes(layout), n_slots = memory / slot_bytes;
    if (n_slots < 1) return NULL;
    if (n_slots > (uint64_t)L * E) n_slots = (uint64_t)L * E;
    ExpertCache *c = xcalloc(1, sizeof(ExpertCache));
    c->path = strdup(path);
    c->fd = fd;
    c->file_size = file_size;
#if defined(O_DIRECT)
    c->direct_fd = open(path, O_RDONLY | O_DIRECT); // where it fails (tmpfs), reads go through the page cache
#elif defined(F_NOCACHE) // macOS: the same through fcntl
    c->direct_fd = open(path, O_RDONLY);
    if (c->direct_fd >= 0 && fcntl(c->direct_fd, F_NOCACHE, 1) != 0) { close(c->direct_fd); c->direct_fd = -1; }
#else
    c->direct_fd = -1;
    (void)path;
#endif
    c->n_layers = L;
    c->n_experts = E;
    c->span = xcalloc((size_t)L * E, sizeof(uint64_t));
    memcpy(c->span, layout->span, (size_t)L * E * sizeof(uint64_t));
    c->span_bytes = layout->span_bytes;
    c->slot_bytes = slot_bytes;
    c->n_slots = (int)n_slots;
    c->memory = memory;
    c->by_usage = policy == EXPERT_CACHE_USAGE;
    c->slots = anon_alloc((uint64_t)c->n_slots * c->slot_bytes, &c->slots_alloc);
    if (!c->slots) die("expert cache: cannot allocate %.2f GB of slots", (double)c->n_slots * c->slot_bytes / 1e9);
    c->slot_of = xcalloc((size_t)L * E, sizeof(int));
    for (int x = 0; x < L * E; x++) c->slot_of[x] = -1;
    c->owner = xcalloc(c->n_slots, sizeof(int));
    for (int s = 0; s < c->n_slots; s++) c->owner[s] = -1;
    c->last_use = xcalloc(c->n_slots, sizeof(uint64_t));
    c->uses = xcalloc((size_t)L * E, sizeof(float));
    c->pinned = xcalloc(c->n_slots, 1);
    c->pending = xcalloc(c->n_slots, sizeof(int));
    c->guessed = xcalloc((size_t)L * E, 1);
    c->q_cap = (int)(c->n_slots * (c->span_bytes / PIECE + 2));
    c->queue = xcalloc(c->q_cap, sizeof(ReadPiece));
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work, NULL);
    pthread_cond_init(&c->done, NULL);
    for (int i = 0; i < IO_THREADS; i++)
        if (pthread_create(&c->io[i], NULL, io_thread, c) != 0) die("expert cache: cannot start I/O threads");
    return c;
}

ExpertCacheReport expert_cache_report(ExpertCache *c) {
    pthread_mutex_lock(&c->mu);
    while (c->in_flight > 0 && !c->failed) pthread_cond_wait(&c->done, &c->mu); // reads ahead may outlive their token
    ExpertCacheReport r = c->stats;
    pthread_mutex_unlock(&c->mu);
    r.n_slots = c->n_slots;
    r.slot_bytes = c->slot_bytes;
    r.memory = c->memory;
    return r;
}

void expert_cache_print(const ExpertCacheReport *r, FILE *out) {
    uint64_t lookups = r->hits + r->misses;
    fprintf(out, "expert cache: %d slots of %.0f MB (memory %.0f MB); hit rate %.1f%% (%llu of %llu); prefetch accuracy "
                 "%.1f%% (%llu of %llu read ahead were used); read %.0f MB at %.0f MB/s; waited %.2f s\n",
            r->n_slots, r->slot_bytes / 1e6, r->memory / 1e6, lookups ? 100.0 * r->hits / lookups : 0.0,
            (unsigned long long)r->hits, (unsigned long long)lookups,
            r->prefetched ? 100.0 * r->prefetch_used / r->prefetched : 0.0, (unsigned long long)r->prefetch_used,
            (unsigned long long)r->prefetched, r->file_bytes / 1e6,
            r->read_seconds > 0 ? r->file_bytes / 1e6 / r->read_seconds : 0.0, r->wait_seconds);
}

void expert_cache_close(ExpertCache *c) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    c->quit = 1;
    pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->mu);
    for (int i = 0; i < IO_THREADS; i++) pthread_join(c->io[i], NULL);
    anon_free(c->slots, c->slots_alloc);
    close(c->fd);
    if (c->direct_fd >= 0) close(c->direct_fd);
    free(c->span); free(c->slot_of); free(c->owner); free(c->last_use); free(c->uses); free(c->pinned); free(c->pending);
    free(c->guessed); free(c->queue); free(c->path);
    free(c);
}
