/*
 * policy.c -- the policy engine over signals (see policy.h; docs/policies.md).
 *
 * One Lua state per worker. At creation the sandbox is built (sandbox_open: chosen
 * libraries only, then the globals that reach outside are removed and `load` replaced by
 * a text-only one), policies.setup runs, and every condition and Lua action is compiled
 * into a function kept in the registry: a condition `when: EXPR` becomes
 *
 *     return function(signal, plugin, conn) local fields = signal.fields return (EXPR
 *     ) end
 *
 * and a `run:` body the same without the `return (...)`; text that starts with
 * `function` is taken as the function itself. The prefix stays on the text's first line,
 * so Lua's line numbers are the text's, and lua_message() turns "policies.list[0].when:3:"
 * into the config file's line.
 *
 * A signal: the policies whose `signal:` matches are tried in order, all inside one
 * protected call (eval_signal), so that even a memory error while building the
 * arguments is caught. The three argument tables are built once per signal, when the
 * first policy matches by name; the plugin's table is built once per plugin and kept.
 * Each call into Lua (call_lua) resets the count hook to policies.timeout instructions;
 * the hook, once it fires, fires on every instruction after, so that an error caught by
 * the policy's own pcall cannot buy it more time: the next instruction outside that
 * pcall fails again. The allocator (sb_alloc) counts the state's bytes and refuses growth
 * past policies.memory; Lua then raises a memory error, which frees what the failed call
 * held. A condition or action that fails is skipped and the host's built-in behaviour
 * applies (policy.h, one rule).
 *
 * The built-in actions are done in C after the protected call: log (a template
 * expanded here, no Lua), terminate (answer appended to the connection's reply),
 * close, passthrough, and send_to_control (a JSON report through the host's one
 * send_to_control path, spk_host_send).
 */
#include "policy.h"

#include <ev.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "host.h"
#include "log.h"

#define ERROR_LOGS_PER_SEC 10

/* What happens to a signal, once a policy decided. */
enum decision {
    D_BUILTIN,
    D_PASSTHROUGH,
    D_TERMINATE,
    D_CLOSE,
};

typedef struct policy {
    const spk_policy_conf *conf;
    char label[96]; /* "policy NAME" or "policies.list[i]" for messages */
    char key[48];   /* "policies.list[i]" */
    bool any;       /* signal: * */
    int when_ref;   /* LUA_NOREF: no condition */
    int run_ref;    /* LUA_NOREF: a built-in action */
} policy;

struct spk_policy {
    lua_State *L;
    const spk_config *cfg;
    spk_host_env *env;
    spk_policy_counters *counters;
    spk_policy_counters own_counters;
    policy *v;
    size_t n;
    int plugins_ref; /* registry table: chain index + 1 -> the plugin's Lua table */
    size_t mem_used, mem_limit;
    int timeout;    /* instructions per call */
    bool timed_out; /* the count hook fired during the current call */
    /* the signal being evaluated (spoke.log and spoke.send_to_control act for it) */
    spk_plugin *cur_plugin;
    const policy *cur_policy;
    uint64_t log_sec;     /* rate limit of failure logs: the current second ... */
    unsigned log_n;       /* ... how many were logged in it ... */
    uint64_t log_dropped; /* ... and how many were not */
    bool has_open;        /* a policy names the host's "open" signal */
    spk_plugin host;      /* who sends the host's own signals: "spoke", ID 0 */
};

/* ---- the state: allocator, hook, sandbox ------------------------------------------- */

static void *sb_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    spk_policy *pol = ud;
    size_t old = ptr != NULL ? osize : 0; /* with ptr NULL, osize is a type tag */
    if (nsize == 0) {
        free(ptr);
        pol->mem_used -= old;
        return NULL;
    }
    if (nsize > old && pol->mem_used + (nsize - old) > pol->mem_limit)
        return NULL; /* Lua collects garbage and tries again, then raises LUA_ERRMEM */
    void *np = realloc(ptr, nsize);
    if (np == NULL)
        return NULL;
    pol->mem_used = pol->mem_used - old + nsize;
    return np;
}

static spk_policy *state_policy(lua_State *L)
{
    return *(spk_policy **)lua_getextraspace(L);
}

static void count_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    spk_policy *pol = state_policy(L);
    pol->timed_out = true;
    lua_sethook(L, count_hook, LUA_MASKCOUNT, 1); /* from now on, every instruction */
    luaL_error(L, "ran past policies.timeout (%d instructions)", pol->timeout);
}

/* load(chunk [, chunkname [, mode [, env]]]) with text chunks only, whatever mode says:
 * a binary chunk could break the VM's invariants. */
static int sb_load(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    const char *name = luaL_optstring(L, 2, "=(load)");
    int has_env = !lua_isnone(L, 4);
    if (luaL_loadbufferx(L, s, len, name, "t") != LUA_OK) {
        luaL_pushfail(L);
        lua_insert(L, -2);
        return 2;
    }
    if (has_env) {
        lua_pushvalue(L, 4);
        if (lua_setupvalue(L, -2, 1) == NULL)
            lua_pop(L, 1);
    }
    return 1;
}

static int level_of(const char *s, spoke_log_level *out)
{
    if (s != NULL && strcmp(s, "warning") == 0) {
        *out = SPOKE_LOG_WARN;
        return 0;
    }
    return s != NULL ? spk_log_parse_level(s, out) : -1;
}

/* The prefix of a line logged on behalf of the current evaluation. */
static void line_prefix(const spk_policy *pol, char *buf, size_t cap)
{
    if (pol->cur_plugin != NULL && pol->cur_policy != NULL)
        snprintf(buf, cap, "%s%s: ", pol->cur_plugin->log_prefix, pol->cur_policy->label);
    else
        snprintf(buf, cap, "policies.setup: ");
}

/* spoke.log(level, text) */
static int sb_log(lua_State *L)
{
    spk_policy *pol = state_policy(L);
    spoke_log_level lvl;
    if (level_of(luaL_checkstring(L, 1), &lvl) != 0)
        return luaL_argerror(L, 1, "expected debug, info, warn or error");
    const char *text = luaL_checkstring(L, 2);
    char prefix[256];
    line_prefix(pol, prefix, sizeof(prefix));
    spk_log(lvl, "%s%s", prefix, text);
    return 0;
}

/* spoke.now(): the worker loop's time in seconds (cached by the loop: no clock read). */
static int sb_now(lua_State *L)
{
    spk_policy *pol = state_policy(L);
    lua_pushnumber(L, pol->env != NULL && pol->env->loop != NULL ? ev_now(pol->env->loop) : 0);
    return 1;
}

/* spoke.send_to_control(payload [, plugin_id]): queue payload for the control plugin
 * plugin_id (default: the signalling plugin's ID). true, or nil and the reason. */
static int sb_send(lua_State *L)
{
    spk_policy *pol = state_policy(L);
    size_t len;
    const char *payload = luaL_checklstring(L, 1, &len);
    if (pol->cur_plugin == NULL)
        return luaL_error(L, "spoke.send_to_control: only while a signal is evaluated");
    lua_Integer id = luaL_optinteger(L, 2, (lua_Integer)pol->cur_plugin->id);
    luaL_argcheck(L, id >= 0 && id <= UINT32_MAX, 2, "expected a plugin ID in 0..4294967295");
    int rc = spk_host_send(pol->cur_plugin, (uint32_t)id, payload, len, NULL, NULL, 0, false, NULL);
    if (rc == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    luaL_pushfail(L);
    lua_pushstring(L, spk_strerror(rc));
    return 2;
}

/* The sandbox: run protected (it allocates). */
static int sandbox_open(lua_State *L)
{
    static const struct {
        const char *name;
        lua_CFunction open;
    } libs[] = {
        {LUA_GNAME, luaopen_base},        {LUA_TABLIBNAME, luaopen_table},
        {LUA_STRLIBNAME, luaopen_string}, {LUA_MATHLIBNAME, luaopen_math},
        {LUA_UTF8LIBNAME, luaopen_utf8},
    };
    for (size_t i = 0; i < sizeof(libs) / sizeof(libs[0]); i++) {
        luaL_requiref(L, libs[i].name, libs[i].open, 1);
        lua_pop(L, 1);
    }
    static const char *const removed[] = {"dofile", "loadfile", "print", "collectgarbage"};
    lua_pushglobaltable(L);
    for (size_t i = 0; i < sizeof(removed) / sizeof(removed[0]); i++) {
        lua_pushnil(L);
        lua_setfield(L, -2, removed[i]);
    }
    lua_pushcfunction(L, sb_load);
    lua_setfield(L, -2, "load");
    lua_getfield(L, -1, LUA_STRLIBNAME);
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);
    static const luaL_Reg spoke_fns[] = {
        {"log", sb_log}, {"now", sb_now}, {"send_to_control", sb_send}, {NULL, NULL}};
    luaL_newlib(L, spoke_fns);
    spk_policy *pol = state_policy(L);
    const char *edge = pol->env != NULL && pol->env->edge_id ? pol->env->edge_id
                       : pol->cfg->edge_id                   ? pol->cfg->edge_id
                                                             : "";
    lua_pushstring(L, edge);
    lua_setfield(L, -2, "edge_id");
    lua_setfield(L, -2, "spoke");
    lua_pop(L, 1);
    lua_newtable(L);
    pol->plugins_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Call the function below its nargs arguments on the stack, under the instruction
 * budget; lua_pcall's status. */
static int call_lua(spk_policy *pol, int nargs, int nres)
{
    pol->timed_out = false;
    lua_sethook(pol->L, count_hook, LUA_MASKCOUNT, pol->timeout);
    return lua_pcall(pol->L, nargs, nres, 0);
}

/* ---- messages ------------------------------------------------------------------------ */

/* The file's line of line l (1-based) of Lua text t: a literal block's lines are the
 * file's (the wrapper's own end is on the text's last line); other text is one line. */
static int file_line(const spk_lua_text *t, int l)
{
    int last = 1;
    for (const char *c = t->code; t->lines && c != NULL && *c; c++)
        last += *c == '\n' && c[1] != '\0';
    return t->line + (l < last ? l : last) - 1;
}

/* Where "CHUNK:N:" is in msg (NULL: not there), with N in *l and what follows in *rest. */
static const char *find_location(const char *msg, const char *chunk, int *l, const char **rest)
{
    size_t cn = strlen(chunk);
    for (const char *at = strstr(msg, chunk); at != NULL; at = strstr(at + 1, chunk)) {
        if (at[cn] != ':' || sscanf(at + cn + 1, "%d", l) != 1 || *l <= 0)
            continue;
        const char *r = strchr(at + cn + 1, ':');
        *rest = r ? r + 1 : "";
        while (**rest == ' ')
            (*rest)++;
        return at;
    }
    return NULL;
}

/* Lua's message with "CHUNK:N:" turned into the config file's line: "file:line: CHUNK:
 * Lua: rest". `chunk` is the chunk's name ("policies.list[0].when"), t its text. An
 * error raised in a function policies.setup defined names setup's line too:
 * "file:line: CHUNK: Lua: file:setupline: rest". */
static void lua_message(const spk_config *cfg, const char *chunk, const spk_lua_text *t,
                        const char *msg, char *out, size_t cap)
{
    const char *file = cfg->file ? cfg->file : "?";
    if (msg == NULL)
        msg = "(an error object that is not a string)";
    int l;
    const char *rest;
    const char *at = find_location(msg, chunk, &l, &rest);
    if (at != NULL) {
        snprintf(out, cap, "%s:%d: %s: Lua: %.*s%s", file, file_line(t, l), chunk, (int)(at - msg),
                 msg, rest);
        return;
    }
    const spk_lua_text *st = &cfg->policy_setup;
    if (st->code != NULL && t != st &&
        (at = find_location(msg, "policies.setup", &l, &rest)) != NULL) {
        snprintf(out, cap, "%s:%d: %s: Lua: %s:%d: (policies.setup) %s", file, file_line(t, 1),
                 chunk, file, file_line(st, l), rest);
        return;
    }
    snprintf(out, cap, "%s:%d: %s: Lua: %s", file, file_line(t, 1), chunk, msg);
}

/* ---- creation ------------------------------------------------------------------------ */

static bool starts_function(const char *code)
{
    while (*code == ' ' || *code == '\t' || *code == '\n' || *code == '\r')
        code++;
    return strncmp(code, "function", 8) == 0 &&
           (code[8] == '(' || code[8] == ' ' || code[8] == '\t' || code[8] == '\n');
}

/* Compile `t` (a condition when `cond`, else an action body) into a function in the
 * registry (*ref). Returns 0, SPK_ENOMEM or SPK_ECONFIG with the message in eb. */
static int compile_fn(spk_policy *pol, const spk_lua_text *t, const char *chunk, bool cond,
                      int *ref, spk_errbuf *eb)
{
    lua_State *L = pol->L;
    static const char head[] = "return function(signal, plugin, conn) local fields = "
                               "signal.fields ";
    const char *pre = head, *mid = "", *post = "\nend";
    if (starts_function(t->code)) {
        pre = "return ";
        post = "\n";
    } else if (cond) {
        mid = "return (";
        post = "\n) end";
    }
    char *src = NULL;
    if (asprintf(&src, "%s%s%s%s", pre, mid, t->code, post) < 0)
        return spk_errf(eb, SPK_ENOMEM, "%s: out of memory compiling %s", pol->cfg->file, chunk);
    char name[64];
    snprintf(name, sizeof(name), "=%s", chunk);
    int st = luaL_loadbufferx(L, src, strlen(src), name, "t");
    free(src);
    if (st == LUA_OK)
        st = call_lua(pol, 0, 1);
    char msg[900];
    if (st == LUA_ERRMEM)
        return spk_errf(eb, SPK_ECONFIG,
                        "%s:%d: %s: Lua: out of policies.memory while "
                        "compiling",
                        pol->cfg->file, t->line, chunk);
    if (st != LUA_OK) {
        lua_message(pol->cfg, chunk, t, lua_tostring(L, -1), msg, sizeof(msg));
        lua_pop(L, 1);
        return spk_errf(eb, SPK_ECONFIG, "%s", msg);
    }
    if (lua_type(L, -1) != LUA_TFUNCTION) {
        lua_pop(L, 1);
        return spk_errf(eb, SPK_ECONFIG,
                        "%s:%d: %s: Lua: text that starts with `function` "
                        "must be one function",
                        pol->cfg->file, t->line, chunk);
    }
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

static int run_setup(spk_policy *pol, spk_errbuf *eb)
{
    const spk_lua_text *t = &pol->cfg->policy_setup;
    if (t->code == NULL)
        return 0;
    lua_State *L = pol->L;
    int st = luaL_loadbufferx(L, t->code, strlen(t->code), "=policies.setup", "t");
    if (st == LUA_OK)
        st = call_lua(pol, 0, 0);
    if (st == LUA_OK)
        return 0;
    char msg[900];
    lua_message(pol->cfg, "policies.setup", t,
                st == LUA_ERRMEM ? "out of policies.memory" : lua_tostring(L, -1), msg,
                sizeof(msg));
    lua_pop(L, 1);
    return spk_errf(eb, SPK_ECONFIG, "%s", msg);
}

static int build(spk_policy *pol, spk_errbuf *eb)
{
    const spk_config *cfg = pol->cfg;
    pol->L = lua_newstate(sb_alloc, pol);
    if (pol->L == NULL)
        return spk_errf(eb, SPK_ENOMEM,
                        "policies: cannot create a Lua state in %llu bytes "
                        "(policies.memory)",
                        (unsigned long long)pol->mem_limit);
    *(spk_policy **)lua_getextraspace(pol->L) = pol;
    lua_pushcfunction(pol->L, sandbox_open);
    if (lua_pcall(pol->L, 0, 0, 0) != LUA_OK)
        return spk_errf(eb, SPK_ENOMEM,
                        "policies: the Lua libraries do not fit in %llu bytes "
                        "(policies.memory)",
                        (unsigned long long)pol->mem_limit);
    int rc = run_setup(pol, eb);
    if (rc != 0)
        return rc;
    pol->v = calloc(cfg->n_policies ? cfg->n_policies : 1, sizeof(*pol->v));
    if (pol->v == NULL)
        return spk_errf(eb, SPK_ENOMEM, "policies: out of memory");
    for (size_t i = 0; i < cfg->n_policies; i++, pol->n++) {
        policy *y = &pol->v[i];
        y->conf = &cfg->policies[i];
        y->any = strcmp(y->conf->signal, "*") == 0;
        y->when_ref = y->run_ref = LUA_NOREF;
        snprintf(y->key, sizeof(y->key), "policies.list[%zu]", i);
        if (y->conf->name != NULL)
            snprintf(y->label, sizeof(y->label), "policy %s", y->conf->name);
        else
            snprintf(y->label, sizeof(y->label), "%s", y->key);
        char chunk[64];
        if (y->conf->when.code != NULL) {
            snprintf(chunk, sizeof(chunk), "%s.when", y->key);
            if ((rc = compile_fn(pol, &y->conf->when, chunk, true, &y->when_ref, eb)) != 0)
                return rc;
        }
        if (y->conf->run.code != NULL) {
            snprintf(chunk, sizeof(chunk), "%s.run", y->key);
            if ((rc = compile_fn(pol, &y->conf->run, chunk, false, &y->run_ref, eb)) != 0)
                return rc;
        }
    }
    lua_gc(pol->L, LUA_GCCOLLECT);
    return 0;
}

int spk_policy_new(const spk_config *cfg, spk_host_env *env, spk_policy_counters *counters,
                   spk_policy **out, spk_errbuf *eb)
{
    *out = NULL;
    if (cfg->n_policies == 0)
        return 0;
    spk_policy *pol = calloc(1, sizeof(*pol));
    if (pol == NULL)
        return spk_errf(eb, SPK_ENOMEM, "policies: out of memory");
    pol->cfg = cfg;
    pol->env = env;
    pol->counters = counters != NULL ? counters : &pol->own_counters;
    pol->mem_limit = (size_t)cfg->policy_memory;
    pol->timeout = (int)cfg->policy_timeout;
    pol->host.name = (char *)"spoke";
    pol->host.index = UINT32_MAX; /* its table's key in plugins_ref: no chain index */
    pol->host.env = env;
    pol->host.slot = &pol->host.own_slot;
    snprintf(pol->host.log_prefix, sizeof(pol->host.log_prefix), "policies: ");
    for (size_t i = 0; i < cfg->n_policies; i++)
        pol->has_open |= strcmp(cfg->policies[i].signal, "open") == 0;
    int rc = build(pol, eb);
    if (rc != 0) {
        spk_policy_free(pol);
        return rc;
    }
    *out = pol;
    return 0;
}

int spk_policy_check(const spk_config *cfg, spk_errbuf *eb)
{
    if (cfg->n_policies == 0 && cfg->policy_setup.code == NULL)
        return 0;
    spk_policy pol = {
        .cfg = cfg, .mem_limit = (size_t)cfg->policy_memory, .timeout = (int)cfg->policy_timeout};
    pol.counters = &pol.own_counters;
    int rc = build(&pol, eb);
    if (pol.L != NULL)
        lua_close(pol.L);
    free(pol.v);
    return rc;
}

void spk_policy_free(spk_policy *pol)
{
    if (pol == NULL)
        return;
    if (pol->L != NULL)
        lua_close(pol->L);
    free(pol->v);
    free(pol);
}

size_t spk_policy_memory(const spk_policy *pol)
{
    return pol != NULL ? pol->mem_used : 0;
}

/* ---- evaluation ---------------------------------------------------------------------- */

typedef struct eval {
    spk_policy *pol;
    spk_plugin *p;
    spoke_conn *conn;
    const char *name;
    const spoke_kv *f;
    size_t n;
    size_t first;           /* the first policy whose signal matches */
    bool host;              /* the host's own signal: `*` does not match it */
    const policy *matched;  /* the policy acted on; NULL: none */
    enum decision lua_says; /* a Lua action's answer */
    bool failed;            /* the matched (or tried) policy failed */
    int status;             /* the failing call's lua_pcall status */
    char err[900];          /* and its message */
} eval;

static bool name_matches(const policy *y, const char *name, bool host)
{
    return (y->any && !host) || strcmp(y->conf->signal, name) == 0;
}

/* Push the three arguments (signal, plugin, conn) of a policy's functions. */
static void push_args(lua_State *L, eval *e)
{
    lua_createtable(L, 0, 2);
    lua_pushstring(L, e->name);
    lua_setfield(L, -2, "name");
    lua_createtable(L, 0, (int)e->n);
    for (size_t i = 0; i < e->n; i++) {
        if (e->f[i].key == NULL || e->f[i].value == NULL)
            continue;
        lua_pushstring(L, e->f[i].value);
        lua_setfield(L, -2, e->f[i].key);
    }
    lua_setfield(L, -2, "fields");
    /* the plugin's table, made once */
    lua_rawgeti(L, LUA_REGISTRYINDEX, e->pol->plugins_ref);
    if (lua_rawgeti(L, -1, (lua_Integer)e->p->index + 1) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_createtable(L, 0, 2);
        lua_pushstring(L, e->p->name);
        lua_setfield(L, -2, "name");
        lua_pushinteger(L, (lua_Integer)e->p->id);
        lua_setfield(L, -2, "id");
        lua_pushvalue(L, -1);
        lua_rawseti(L, -3, (lua_Integer)e->p->index + 1);
    }
    lua_remove(L, -2);
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, e->conn != NULL ? (lua_Integer)e->conn->id : 0);
    lua_setfield(L, -2, "id");
    lua_pushstring(L, e->conn != NULL ? e->conn->peer : "");
    lua_setfield(L, -2, "peer");
}

/* Record why a call failed (its message is on the stack) and pop it. */
static void call_failed(eval *e, const policy *y, const char *part, int st)
{
    lua_State *L = e->pol->L;
    char chunk[64];
    snprintf(chunk, sizeof(chunk), "%s.%s", y->key, part);
    const spk_lua_text *t = strcmp(part, "when") == 0 ? &y->conf->when : &y->conf->run;
    const char *msg = st == LUA_ERRMEM ? "ran out of policies.memory" : lua_tostring(L, -1);
    lua_message(e->pol->cfg, chunk, t, msg, e->err, sizeof(e->err));
    lua_pop(L, 1);
    e->failed = true;
    e->status = st;
    e->matched = y;
}

static int decision_of(const char *s, enum decision *d)
{
    static const struct {
        const char *word;
        enum decision d;
    } words[] = {{"builtin", D_BUILTIN},
                 {"passthrough", D_PASSTHROUGH},
                 {"terminate", D_TERMINATE},
                 {"close", D_CLOSE}};
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++)
        if (strcmp(s, words[i].word) == 0) {
            *d = words[i].d;
            return 0;
        }
    return -1;
}

/* A Lua action's results: nothing (passthrough), or a decision and, for terminate, an
 * answer to send first. */
static void lua_results(eval *e, const policy *y)
{
    lua_State *L = e->pol->L;
    e->lua_says = D_PASSTHROUGH;
    if (lua_isnoneornil(L, -2))
        return;
    const char *what = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    if (what == NULL || decision_of(what, &e->lua_says) != 0) {
        lua_pushfstring(L,
                        "returned %s%s%s; expected nothing, 'builtin', 'passthrough', "
                        "'terminate' or 'close'",
                        what ? "'" : "", what ? what : luaL_typename(L, -2), what ? "'" : "");
        call_failed(e, y, "run", LUA_ERRRUN);
        return;
    }
    size_t alen;
    const char *answer = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &alen) : NULL;
    if (e->lua_says == D_TERMINATE && answer != NULL && e->conn != NULL &&
        spk_bytes_append(&e->conn->reply, answer, alen) != 0) {
        lua_pushfstring(L, "out of memory queueing the answer");
        call_failed(e, y, "run", LUA_ERRMEM);
    }
}

/* The protected evaluation of one signal (its argument is the eval). */
static int eval_signal(lua_State *L)
{
    eval *e = lua_touserdata(L, 1);
    spk_policy *pol = e->pol;
    bool have_args = false;
    for (size_t i = e->first; i < pol->n; i++) {
        const policy *y = &pol->v[i];
        if (!name_matches(y, e->name, e->host))
            continue;
        pol->cur_policy = y;
        if (!have_args) {
            push_args(L, e); /* stack: eval, signal, plugin, conn */
            have_args = true;
        }
        if (y->when_ref != LUA_NOREF) {
            lua_rawgeti(L, LUA_REGISTRYINDEX, y->when_ref);
            lua_pushvalue(L, 2);
            lua_pushvalue(L, 3);
            lua_pushvalue(L, 4);
            int st = call_lua(pol, 3, 1);
            if (st != LUA_OK) {
                call_failed(e, y, "when", st);
                return 0;
            }
            bool holds = lua_toboolean(L, -1);
            lua_pop(L, 1);
            if (!holds)
                continue;
        }
        e->matched = y;
        if (y->run_ref == LUA_NOREF)
            return 0;
        lua_rawgeti(L, LUA_REGISTRYINDEX, y->run_ref);
        lua_pushvalue(L, 2);
        lua_pushvalue(L, 3);
        lua_pushvalue(L, 4);
        int st = call_lua(pol, 3, 2);
        if (st != LUA_OK) {
            call_failed(e, y, "run", st);
            return 0;
        }
        lua_results(e, y);
        lua_pop(L, 2);
        return 0;
    }
    return 0;
}

/* Log a failure, at most ERROR_LOGS_PER_SEC a second per worker. */
__attribute__((format(printf, 2, 3))) static void failure_log(spk_policy *pol, const char *fmt, ...)
{
    uint64_t sec = pol->env && pol->env->loop ? (uint64_t)ev_now(pol->env->loop) : 0;
    if (sec != pol->log_sec) {
        if (pol->log_dropped > 0)
            spk_warn("policies: %llu more failures not logged in the last second(s)",
                     (unsigned long long)pol->log_dropped);
        pol->log_sec = sec;
        pol->log_n = 0;
        pol->log_dropped = 0;
    }
    if (pol->log_n >= ERROR_LOGS_PER_SEC && sec != 0) {
        pol->log_dropped++;
        return;
    }
    pol->log_n++;
    char msg[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    spk_warn("%s", msg);
}

static void count(_Atomic uint64_t *c)
{
    atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

/* A failed Lua call: counted by kind, logged; the built-in behaviour follows. */
static void lua_failed(spk_policy *pol, const eval *e)
{
    const char *kind;
    if (e->status == LUA_ERRMEM) {
        count(&pol->counters->memory);
        kind = "out of memory";
    } else if (pol->timed_out) {
        count(&pol->counters->timeouts);
        kind = "timeout";
    } else {
        count(&pol->counters->errors);
        kind = "error";
    }
    failure_log(pol, "%s%s skipped (%s) for signal '%s'%s: %s; built-in behaviour applies",
                e->p->log_prefix, e->matched ? e->matched->label : "policies", kind, e->name,
                e->conn ? "" : " (no connection)", e->err);
}

static void action_failed(spk_policy *pol, const eval *e, const char *why)
{
    count(&pol->counters->action_failed);
    failure_log(pol, "%s%s: action %s failed for signal '%s': %s; built-in behaviour applies",
                e->p->log_prefix, e->matched->label,
                e->matched->conf->action == SPK_PA_SEND_TO_CONTROL ? "send_to_control"
                                                                   : "on the connection",
                e->name, why);
}

/* ---- built-in actions ------------------------------------------------------------------ */

static const char *field_of(const eval *e, const char *key, size_t klen)
{
    for (size_t i = 0; i < e->n; i++)
        if (e->f[i].key != NULL && e->f[i].value != NULL && strlen(e->f[i].key) == klen &&
            memcmp(e->f[i].key, key, klen) == 0)
            return e->f[i].value;
    return NULL;
}

typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (b->len + 1 >= b->cap)
        return;
    size_t room = b->cap - 1 - b->len;
    if (n > room)
        n = room;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void put_fields(sbuf *b, const eval *e)
{
    for (size_t i = 0; i < e->n; i++) {
        if (e->f[i].key == NULL || e->f[i].value == NULL)
            continue;
        if (i > 0)
            sb_puts(b, " ");
        sb_puts(b, e->f[i].key);
        sb_puts(b, "=");
        sb_puts(b, e->f[i].value);
    }
}

/* Expand a log template: ${name} ${plugin} ${plugin_id} ${conn} ${peer} ${policy}
 * ${fields}, and ${KEY} for the signal's field KEY ("" when it has none). */
static void expand(const eval *e, const char *tpl, char *out, size_t cap)
{
    sbuf b = {out, 0, cap};
    out[0] = '\0';
    char num[24];
    for (const char *s = tpl; *s;) {
        const char *end = s[0] == '$' && s[1] == '{' ? strchr(s + 2, '}') : NULL;
        if (end == NULL) {
            const char *next = strstr(s + 1, "${");
            size_t n = next ? (size_t)(next - s) : strlen(s);
            sb_put(&b, s, n);
            s += n;
            continue;
        }
        const char *k = s + 2;
        size_t kl = (size_t)(end - k);
#define IS(w) (kl == sizeof(w) - 1 && memcmp(k, w, kl) == 0)
        if (IS("name")) {
            sb_puts(&b, e->name);
        } else if (IS("plugin")) {
            sb_puts(&b, e->p->name);
        } else if (IS("plugin_id")) {
            snprintf(num, sizeof(num), "%u", e->p->id);
            sb_puts(&b, num);
        } else if (IS("conn")) {
            snprintf(num, sizeof(num), "%llu", (unsigned long long)(e->conn ? e->conn->id : 0));
            sb_puts(&b, num);
        } else if (IS("peer")) {
            sb_puts(&b, e->conn ? e->conn->peer : "");
        } else if (IS("policy")) {
            sb_puts(&b, e->matched->conf->name ? e->matched->conf->name : e->matched->key);
        } else if (IS("fields")) {
            put_fields(&b, e);
        } else {
            const char *v = field_of(e, k, kl);
            sb_puts(&b, v ? v : "");
        }
#undef IS
        s = end + 1;
    }
}

static void do_log(const eval *e)
{
    const spk_policy_conf *pc = e->matched->conf;
    spoke_log_level lvl = SPOKE_LOG_INFO;
    if (pc->level > 0)
        lvl = (spoke_log_level)(pc->level - 1);
    else
        level_of(field_of(e, "level", 5), &lvl); /* the signal's own, else info */
    if (lvl < spk_log_get_level())
        return;
    /* the built-in text: a log signal's message, else the signal and its fields */
    const char *tpl = pc->message                   ? pc->message
                      : strcmp(e->name, "log") == 0 ? "${message}"
                                                    : "signal ${name}: ${fields}";
    char text[2048], cid[48] = "";
    expand(e, tpl, text, sizeof(text));
    if (e->conn != NULL)
        snprintf(cid, sizeof(cid), "conn %llu: ", (unsigned long long)e->conn->id);
    spk_log(lvl, "%s%s%s", e->p->log_prefix, cid, text);
}

static void json_str(spk_bytes *b, int *rc, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    *rc |= spk_bytes_append(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[6] = {'\\', 'u', '0', '0', hex[*p >> 4], hex[*p & 15]};
        if (*p == '"' || *p == '\\')
            *rc |= spk_bytes_append(b, (char[]){'\\', (char)*p}, 2);
        else if (*p < 0x20)
            *rc |= spk_bytes_append(b, esc, 6);
        else
            *rc |= spk_bytes_append(b, p, 1);
    }
    *rc |= spk_bytes_append(b, "\"", 1);
}

/* The report: {"signal","fields","plugin","plugin_id","conn","peer","policy"} as JSON. */
static int do_send(const eval *e, const char **why)
{
    spk_bytes b = {0};
    int rc = 0;
    char num[48];
    rc |= spk_bytes_append(&b, "{\"signal\":", 10);
    json_str(&b, &rc, e->name);
    rc |= spk_bytes_append(&b, ",\"fields\":{", 11);
    bool first = true;
    for (size_t i = 0; i < e->n; i++) {
        if (e->f[i].key == NULL || e->f[i].value == NULL)
            continue;
        if (!first)
            rc |= spk_bytes_append(&b, ",", 1);
        first = false;
        json_str(&b, &rc, e->f[i].key);
        rc |= spk_bytes_append(&b, ":", 1);
        json_str(&b, &rc, e->f[i].value);
    }
    rc |= spk_bytes_append(&b, "},\"plugin\":", 11);
    json_str(&b, &rc, e->p->name);
    int nl = snprintf(num, sizeof(num), ",\"plugin_id\":%u,\"conn\":%llu,\"peer\":", e->p->id,
                      (unsigned long long)(e->conn ? e->conn->id : 0));
    rc |= spk_bytes_append(&b, num, (size_t)nl);
    json_str(&b, &rc, e->conn ? e->conn->peer : "");
    rc |= spk_bytes_append(&b, ",\"policy\":", 10);
    const spk_policy_conf *pc = e->matched->conf;
    json_str(&b, &rc, pc->name ? pc->name : e->matched->key);
    rc |= spk_bytes_append(&b, "}", 1);
    if (rc != 0) {
        spk_bytes_free(&b);
        *why = "out of memory";
        return SPK_ENOMEM;
    }
    uint32_t to = pc->to != 0 ? pc->to : e->p->id;
    const spoke_kv md[] = {{"signal", e->name}};
    rc = spk_host_send(e->p, to, b.data, b.len, NULL, md, 1, true, NULL);
    spk_bytes_free(&b);
    *why = rc != 0 ? spk_strerror(rc) : NULL;
    return rc;
}

/* Apply a decision to the signal; SPK_POLICY_BUILTIN or 0. */
static int apply(spk_policy *pol, const eval *e, enum decision d)
{
    switch (d) {
    case D_BUILTIN:
        return SPK_POLICY_BUILTIN;
    case D_PASSTHROUGH:
        return 0;
    case D_TERMINATE:
    case D_CLOSE:
        if (e->conn == NULL) {
            action_failed(pol, e, "the signal has no connection");
            return SPK_POLICY_BUILTIN;
        }
        if (d == D_CLOSE)
            e->conn->reply.len = 0; /* close: nothing more is sent */
        e->conn->flags |= SPK_CONN_TERMINATE;
        spk_info("%sconn %llu: %s by %s (signal '%s')", e->p->log_prefix,
                 (unsigned long long)e->conn->id, d == D_CLOSE ? "closed" : "terminated",
                 e->matched->label, e->name);
        return 0;
    }
    return SPK_POLICY_BUILTIN;
}

static enum decision then_of(int then, enum decision dflt)
{
    switch (then) {
    case SPK_PT_BUILTIN:
        return D_BUILTIN;
    case SPK_PT_PASSTHROUGH:
        return D_PASSTHROUGH;
    case SPK_PT_TERMINATE:
        return D_TERMINATE;
    case SPK_PT_CLOSE:
        return D_CLOSE;
    default:
        return dflt;
    }
}

static int evaluate(spk_policy *pol, spk_plugin *p, spoke_conn *conn, const char *name,
                    const spoke_kv *f, size_t n, bool host);
static int act(spk_policy *pol, eval *e);

int spk_policy_signal(spk_policy *pol, spk_plugin *p, spoke_conn *conn, const char *name,
                      const spoke_kv *f, size_t n)
{
    return evaluate(pol, p, conn, name, f, n, false);
}

void spk_policy_open(spk_policy *pol, spoke_conn *conn)
{
    if (pol->has_open)
        evaluate(pol, &pol->host, conn, "open", NULL, 0, true);
}

static int evaluate(spk_policy *pol, spk_plugin *p, spoke_conn *conn, const char *name,
                    const spoke_kv *f, size_t n, bool host)
{
    size_t first = 0;
    while (first < pol->n && !name_matches(&pol->v[first], name, host))
        first++;
    if (first == pol->n)
        return SPK_POLICY_BUILTIN;
    eval e = {.pol = pol,
              .p = p,
              .conn = conn,
              .name = name,
              .f = f,
              .n = n,
              .first = first,
              .host = host};
    const policy *y = &pol->v[first];
    if (y->when_ref == LUA_NOREF && y->run_ref == LUA_NOREF) {
        e.matched = y; /* a built-in action without a condition: no Lua at all */
        return act(pol, &e);
    }
    lua_State *L = pol->L;
    pol->cur_plugin = p;
    lua_settop(L, 0);
    lua_pushcfunction(L, eval_signal);
    lua_pushlightuserdata(L, &e);
    int st = lua_pcall(L, 1, 0, 0);
    if (st != LUA_OK) { /* building the arguments failed: out of memory */
        snprintf(e.err, sizeof(e.err), "%s",
                 st == LUA_ERRMEM      ? "ran out of policies.memory "
                                         "building the signal's tables"
                 : lua_tostring(L, -1) ? lua_tostring(L, -1)
                                       : "an error that is not a string");
        e.status = st;
        e.failed = true;
    }
    lua_settop(L, 0);
    pol->cur_plugin = NULL;
    pol->cur_policy = NULL;
    if (e.failed) {
        lua_failed(pol, &e);
        return SPK_POLICY_BUILTIN;
    }
    if (e.matched == NULL)
        return SPK_POLICY_BUILTIN;
    return act(pol, &e);
}

/* Do the matched policy's action. */
static int act(spk_policy *pol, eval *e)
{
    spoke_conn *conn = e->conn;
    count(&pol->counters->matched);
    const spk_policy_conf *pc = e->matched->conf;
    const char *why;
    switch (pc->action) {
    case SPK_PA_LOG:
        do_log(e);
        return apply(pol, e, then_of(pc->then, D_PASSTHROUGH));
    case SPK_PA_SEND_TO_CONTROL:
        if (do_send(e, &why) != 0) {
            action_failed(pol, e, why);
            return SPK_POLICY_BUILTIN;
        }
        return apply(pol, e, then_of(pc->then, D_BUILTIN));
    case SPK_PA_TERMINATE:
        if (conn != NULL && pc->answer != NULL &&
            spk_bytes_append(&conn->reply, pc->answer, strlen(pc->answer)) != 0) {
            action_failed(pol, e, "out of memory queueing the answer");
            return SPK_POLICY_BUILTIN;
        }
        return apply(pol, e, D_TERMINATE);
    case SPK_PA_CLOSE:
        return apply(pol, e, D_CLOSE);
    case SPK_PA_LUA:
        return apply(pol, e, e->lua_says);
    case SPK_PA_PASSTHROUGH:
    default:
        return 0;
    }
}
