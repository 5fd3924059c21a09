/*
 * policy.h -- policies over signals: what the host does when a plugin emits a signal
 * (host->signal()), decided by rules the operator writes in the config's `policies:`
 * section, in embedded Lua 5.4 (docs/policies.md is the operator's manual).
 *
 * Model. Each policy names a signal (or `*`), an optional Lua condition, and an action: a
 * built-in one (log, terminate, passthrough, close, send_to_control) or one written in
 * Lua. For each signal the policies are tried in config order; the first whose signal
 * matches and whose condition holds is acted on, and that is all. With no match, or when
 * the policy that matched fails (its Lua raised an error, ran past policies.timeout
 * instructions or out of policies.memory, or its built-in action could not be done), the
 * signal gets the host's built-in behaviour (host.c), as if there were no policy: one
 * rule, so a broken policy never stops traffic. Failures are logged (rate-limited) and
 * counted in the worker's spk_policy_counters (`spoked status`).
 *
 * Sandbox. One Lua state per worker, created when the worker starts (so once per
 * generation, and a reload builds new ones), holding only the base library (without
 * dofile, loadfile, print, collectgarbage; `load` takes text only), string (without
 * dump), table, math and utf8, plus a `spoke` table (log, now, send_to_control,
 * edge_id). No io, os, package/require, debug or coroutine. Every call into Lua runs
 * under a count hook of policies.timeout instructions and an allocator that refuses to
 * grow the state past policies.memory.
 *
 * Cost. Nothing runs unless a plugin emits a signal. A signal no policy names costs a
 * string compare per policy; Lua is entered only when a policy's signal matches.
 *
 * Threads and processes: an engine belongs to one worker and is used on its loop thread.
 */
#ifndef SPK_POLICY_H
#define SPK_POLICY_H

#include <stddef.h>

#include "chain.h"
#include "config.h"
#include "err.h"
#include "loader.h"
#include "status.h"

typedef struct spk_policy spk_policy;

/* What spk_policy_signal() returns when the host's built-in behaviour applies. */
#define SPK_POLICY_BUILTIN 1

/* Build a sandbox of cfg's policies.memory, run policies.setup in it and compile every
 * condition and Lua action of cfg->policies, then throw it away: the check that config
 * loading runs (spoked --check-config, start, reload). Returns 0, SPK_ENOMEM, or
 * SPK_ECONFIG with "file:line: policies.list[i].when: Lua: message" in eb, the line
 * being the config file's line of the error. */
int spk_policy_check(const spk_config *cfg, spk_errbuf *eb);

/* The engine of one worker for cfg's policies (cfg borrowed: it must outlive the
 * engine). env (borrowed; may be NULL in tests and tools: no loop time, no queue) is the
 * worker's host environment, counters (borrowed; may be NULL) where it counts. With no
 * policy configured *out is NULL and 0 is returned: the host then never enters the
 * engine. Errors as spk_policy_check(). Free with spk_policy_free(). */
int spk_policy_new(const spk_config *cfg, spk_host_env *env, spk_policy_counters *counters,
                   spk_policy **out, spk_errbuf *eb);

/* Close the engine's Lua state and free it. NULL is allowed. */
void spk_policy_free(spk_policy *pol);

/* Decide what signal `name` with fields f[0..n) from plugin p on connection conn (NULL:
 * none) does. Returns SPK_POLICY_BUILTIN when the host's built-in behaviour applies (no
 * policy matched, or the one that did failed), else what host->signal() returns to the
 * plugin (0) once the policy's action is done: a log line, a report queued for the
 * control plane, conn flagged SPK_CONN_TERMINATE (with the answer appended to its reply,
 * or its reply dropped for close). */
int spk_policy_signal(spk_policy *pol, spk_plugin *p, spoke_conn *conn, const char *name,
                      const spoke_kv *f, size_t n);

/* The host's own signal "open", for a connection that was just accepted (before any
 * plugin's on_open): the policies that name "open" (not `*`: that means every signal of
 * a plugin) are tried as for a plugin's signal, with plugin {name = "spoke", id = 0}.
 * terminate or close flag conn SPK_CONN_TERMINATE (the chain then refuses it); the
 * built-in behaviour of "open" is to do nothing. Costs one test when no policy names
 * "open". */
void spk_policy_open(spk_policy *pol, spoke_conn *conn);

/* Bytes the engine's Lua state holds now (for tests and spoke-bench). */
size_t spk_policy_memory(const spk_policy *pol);

#endif
