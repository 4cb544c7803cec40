/* A tiny work-sharing pool for the kernel: the calling thread always works, helper threads join in when
 * they are running, and the caller never waits for a helper that has not started an item.
 *
 * Why not OpenMP: its parallel region ends with a join, so on a shared, oversubscribed machine (2 cores,
 * several busy processes) every call waits for a preempted helper to be scheduled again; measured, that
 * made 2 threads many times slower than 1. Here a late helper finds no items left and the call is done.
 *
 * Claiming: one 64-bit atomic ticket = (job generation << 32) | next item. A helper claims item i of job
 * g only by a compare-exchange that still sees generation g, and the caller publishes job g+1 only after
 * every item of job g is claimed and finished, so a helper can never run an item of a finished job. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#include "tq2k.h"

#define MAX_HELPERS 15
#define SPIN_ROUNDS 2000 /* pause instructions (tens of microseconds) a helper polls before sleeping: warm
                           * between the layers of one forward pass without holding a shared core */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    int helpers;                /* created so far */
    atomic_int busy;            /* one caller at a time; a concurrent caller runs its items alone */
    atomic_uint_fast64_t ticket;
    atomic_int done;
    atomic_int sleeping;
    atomic_int joined;          /* helpers that took part in the current job */
    tq2k_item_fn fn;            /* the current job, published before its ticket */
    const void *ctx;
    int nitems;
    int allowed;                /* helpers the current job may use: threads - 1 */
    uint32_t gen;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, NULL, NULL, 0, 0, 0};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and run items of the job whose ticket generation is `gen`; returns when none are left. */
static void work(uint32_t gen, tq2k_item_fn fn, const void *ctx, int nitems) {
    uint64_t t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(t >> 32) != gen || (uint32_t)t >= (uint32_t)nitems) return;
        if (atomic_compare_exchange_weak_explicit(&pool.ticket, &t, t + 1, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            fn(ctx, (int)(uint32_t)t);
            atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
            t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
        }
    }
}

static void *helper_main(void *arg) {
    (void)arg;
    uint32_t seen = 0;
    for (;;) {
        uint64_t t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
        int spins = 0;
        while ((uint32_t)(t >> 32) == seen) {
            if (++spins < SPIN_ROUNDS) {
                cpu_relax();
            } else { /* idle: sleep until the next job is published */
                pthread_mutex_lock(&pool.mu);
                atomic_fetch_add(&pool.sleeping, 1);
                while ((uint32_t)(atomic_load(&pool.ticket) >> 32) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
                atomic_fetch_sub(&pool.sleeping, 1);
                pthread_mutex_unlock(&pool.mu);
                spins = 0;
            }
            t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
        }
        seen = (uint32_t)(t >> 32);
        /* fields were written before the ticket (release/acquire): they belong to job `seen` or the job
         * is over, in which case work() finds the generation changed or no items left. Helpers beyond the
         * job's thread count sit it out (a pool grown by an earlier, larger request). */
        if (atomic_fetch_add(&pool.joined, 1) < pool.allowed) work(seen, pool.fn, pool.ctx, pool.nitems);
    }
    return NULL;
}

/* In a forked child the helpers do not exist: start from an empty pool (a lock a helper held at fork
 * time would otherwise never be released). */
static void reset_after_fork(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.helpers = 0;
    atomic_store(&pool.sleeping, 0);
    atomic_store(&pool.busy, 0);
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, reset_after_fork); }

void tq2k_parallel(int nitems, int threads, tq2k_item_fn fn, const void *ctx) {
    int expected = 0;
    if (threads <= 1 || nitems <= 1 || !atomic_compare_exchange_strong(&pool.busy, &expected, 1)) {
        for (int i = 0; i < nitems; i++) fn(ctx, i);
        return;
    }
    pthread_once(&atfork_once, register_atfork);
    const int want = threads - 1 < MAX_HELPERS ? threads - 1 : MAX_HELPERS;
    while (pool.helpers < want) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, helper_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* fewer helpers: the caller does the rest */
        pool.helpers++;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.nitems = nitems;
    pool.allowed = want;
    atomic_store_explicit(&pool.joined, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    const uint32_t gen = ++pool.gen;
    atomic_store_explicit(&pool.ticket, (uint64_t)gen << 32, memory_order_release);
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mu);
    }
    work(gen, fn, ctx, nitems);
    /* every item is claimed: wait only for the ones helpers are still running */
    int spins = 0;
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < nitems) {
        if (++spins < 1000) cpu_relax();
        else sched_yield();
    }
    /* close the job before its fields are reused: a helper that read the next job's fields while still
     * seeing this generation must find no item to claim */
    atomic_store_explicit(&pool.ticket, ((uint64_t)gen << 32) | 0xFFFFFFFFu, memory_order_release);
    atomic_store(&pool.busy, 0);
}
