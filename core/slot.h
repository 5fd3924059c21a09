/*
 * slot.h -- the watchdog slot: where a process that runs plugin code says which plugin and
 * hook run now, and the one pair of helpers that stamp it.
 *
 * A slot lives in the supervisor's shared status region (status.h: one per worker) or, in a
 * process nobody supervises, anywhere. Exactly one thread writes it: the process's loop,
 * which runs every hook. The supervisor reads it from another process, with no lock.
 *
 * Every call into a plugin goes between spk_slot_enter() and spk_slot_leave(): the traffic
 * hooks (chain.c), init and on_config_loaded (loader.c), fini and timers (host.c), health
 * (worker.c). One store order, written once here, is what the supervisor relies on:
 *
 *   enter   1. hook    = H                  relaxed
 *           2. seq     = seq + 1            relaxed (plain load and store: one writer)
 *           3. plugin  = index + 1          release: publishes 1 and 2
 *   leave   4. plugin  = 0                  relaxed
 *
 * The reader (the watchdog, and the crash attribution once a worker died) loads `plugin`
 * with acquire first, then `hook` and `seq`. So a reader that sees plugin P of an entry
 * sees that entry's hook and a seq at least that entry's: it never pairs a new plugin with
 * the previous hook's name, and never sees the same (plugin, seq) pair across two calls
 * of one plugin, which would add their times into one false hook timeout. A reader that
 * sees plugin 0 knows nothing runs, whatever hook and seq say. After a crash the writer
 * is dead and every store it made is visible, so the last entry without a leave names the
 * hook that crashed.
 *
 * Cost per hook: on x86 all four stores are plain movs (a release store is a mov that the
 * compiler may not move earlier stores past), no fence and no lock prefix; no clock is read:
 * the supervisor measures how long the same (plugin, seq) pair stays, which bounds a
 * hook's run time to within one sampling period.
 */
#ifndef SPK_SLOT_H
#define SPK_SLOT_H

#include <stdatomic.h>
#include <stdint.h>

/* What a slot's `hook` says runs. Internal numbering (not the ABI's): append only, the
 * supervisor and its workers are one build, but keep the names stable for logs. */
enum spk_hook_id {
    SPK_HOOK_FROM_CLIENT = 0,
    SPK_HOOK_TO_SERVER = 1,
    SPK_HOOK_FROM_SERVER = 2,
    SPK_HOOK_TO_CLIENT = 3,
    SPK_HOOK_OPEN = 4,
    SPK_HOOK_CLOSE = 5,
    SPK_HOOK_TICK = 6,
    SPK_HOOK_HEALTH = 7,
    SPK_HOOK_INIT = 8,
    SPK_HOOK_FINI = 9,
    SPK_HOOK_TIMER = 10,
    SPK_HOOK_ACCEPT = 11,
    SPK_HOOK_CONFIG_LOADED = 12,
    SPK_HOOK_HALF_CLOSE = 13,
    SPK_HOOK_COUNT
};

/* The hook's name as the plugin author knows it ("on_open"); "?" for an unknown value. */
static inline const char *spk_hook_name(enum spk_hook_id hook)
{
    static const char *const names[SPK_HOOK_COUNT] = {
        "on_traffic_from_client", "on_traffic_to_server", "on_traffic_from_server",
        "on_traffic_to_client", "on_open", "on_close", "on_tick", "health", "init", "fini",
        "timer", "accept_edge_payload", "on_config_loaded", "on_half_close",
    };
    return (unsigned)hook < SPK_HOOK_COUNT ? names[hook] : "?";
}

/* `plugin` is the chain index + 1 of the plugin running now (0: none), `hook` its
 * spk_hook_id, `seq` increments on every entry. `heartbeat_ms` is stamped by the worker's
 * loop every 100 ms (CLOCK_MONOTONIC). `in_host` is 1 while a hook waits in a host service
 * that may wait for the disk (send_to_control with queue.sync: always, or a full journal):
 * that time is not the plugin's, and the watchdog restarts its clock. */
typedef struct spk_slot {
    _Atomic uint32_t plugin;
    _Atomic uint32_t hook;
    _Atomic uint64_t seq;
    _Atomic uint64_t heartbeat_ms;
    _Atomic uint32_t in_host;
} spk_slot;

/* Plugin `index` (its chain index) enters `hook`. `s` is never NULL. */
static inline void spk_slot_enter(spk_slot *s, uint32_t index, enum spk_hook_id hook)
{
    atomic_store_explicit(&s->hook, (uint32_t)hook, memory_order_relaxed);
    /* One writer: a plain load and store, not an atomic read-modify-write (lock xadd),
     * which would cost more than the hook. */
    atomic_store_explicit(&s->seq, atomic_load_explicit(&s->seq, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    atomic_store_explicit(&s->plugin, index + 1, memory_order_release);
}

/* The plugin that entered last returned. */
static inline void spk_slot_leave(spk_slot *s)
{
    atomic_store_explicit(&s->plugin, 0, memory_order_relaxed);
}

/* The running hook waits in a host service (on = 1) or is back in the plugin (on = 0). */
static inline void spk_slot_in_host(spk_slot *s, int on)
{
    atomic_store_explicit(&s->in_host, on ? 1u : 0u, memory_order_relaxed);
}

#endif
