/*
 * metrics.c -- the metrics workers keep in their status slot, and the supervisor's merge
 * of them (see metrics.h).
 *
 * Worker side: spk_pm_register() and spk_pm_series_get() append to the slot's plugin
 * metrics (checked against Prometheus's naming rules first) and publish with a release
 * store of the count; spk_hook_observe() files a timed hook call in its bucket.
 *
 * Supervisor side: an `agg` is a set of families keyed by name, each holding series
 * keyed by (plugin, label values) with their values as doubles, plus the hook stats keyed
 * by plugin name. The base is an agg that only ever grows (folded slots); a scrape copies
 * it, adds the live slots and prints the result. Families of the same name from two
 * plugins merge when they agree on type, labels and buckets; a later one that does not is
 * left out (and counted in spoke_plugin_metric_conflicts).
 */
#include "metrics.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

spk_hookstat spk_hookstat_sink[SPK_HOOK_COUNT];

static const uint64_t hook_bounds_ns[SPK_HOOK_BUCKETS - 1] = SPK_HOOK_BOUNDS_NS;

void spk_hook_observe(spk_hookstat *st, uint64_t ns)
{
    unsigned b = 0;
    while (b < SPK_HOOK_BUCKETS - 1 && ns > hook_bounds_ns[b])
        b++;
    spk_stat_inc(&st->bucket[b], 1);
    spk_stat_inc(&st->timed, 1);
    spk_stat_inc(&st->sum_ns, ns);
}

/* ---- names ---------------------------------------------------------------------------- */

static bool name_char(char c, bool first, bool colon)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_')
        return true;
    if (colon && c == ':')
        return true;
    return !first && c >= '0' && c <= '9';
}

bool spk_metric_name_ok(const char *s)
{
    if (s == NULL || *s == '\0')
        return false;
    for (size_t i = 0; s[i]; i++)
        if (!name_char(s[i], i == 0, true))
            return false;
    return true;
}

bool spk_label_name_ok(const char *s)
{
    if (s == NULL || *s == '\0' || strncmp(s, "__", 2) == 0)
        return false;
    for (size_t i = 0; s[i]; i++)
        if (!name_char(s[i], i == 0, false))
            return false;
    return true;
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static const char *type_name(int type)
{
    return type == SPK_PM_COUNTER ? "counter" : type == SPK_PM_GAUGE ? "gauge" : "histogram";
}

/* ---- worker side: registration -------------------------------------------------------- */

static int check_family(int type, const char *name, const char *help,
                        const char *const *labels, size_t n_labels, const double *buckets,
                        size_t n_buckets, spk_errbuf *eb)
{
    if (type < SPK_PM_COUNTER || type > SPK_PM_HISTOGRAM)
        return spk_errf(eb, SPK_EINVAL, "metric_register: unknown metric type %d", type);
    if (!spk_metric_name_ok(name))
        return spk_errf(eb, SPK_EINVAL, "metric_register: '%s' is not a Prometheus metric "
                        "name ([a-zA-Z_:][a-zA-Z0-9_:]*)", name ? name : "(null)");
    if (strlen(name) >= SPK_PM_NAME)
        return spk_errf(eb, SPK_EINVAL, "metric_register: name '%s' is over %d bytes", name,
                        SPK_PM_NAME - 1);
    if (strncmp(name, "spoke_", 6) == 0)
        return spk_errf(eb, SPK_EINVAL, "metric_register: '%s': the prefix spoke_ is the "
                        "host's", name);
    if (type == SPK_PM_COUNTER && !ends_with(name, "_total"))
        return spk_errf(eb, SPK_EINVAL, "metric_register: counter '%s' must end in _total "
                        "(OpenMetrics names counter samples so)", name);
    if (type != SPK_PM_COUNTER && (ends_with(name, "_total") || ends_with(name, "_bucket") ||
                                   ends_with(name, "_count") || ends_with(name, "_sum") ||
                                   ends_with(name, "_created")))
        return spk_errf(eb, SPK_EINVAL, "metric_register: %s '%s' ends in a suffix reserved "
                        "for counters and histograms", type_name(type), name);
    if (help != NULL && strlen(help) >= SPK_PM_HELP)
        return spk_errf(eb, SPK_EINVAL, "metric_register: '%s': help text over %d bytes", name,
                        SPK_PM_HELP - 1);
    if (n_labels > SPK_PM_LABELS || (labels == NULL && n_labels > 0))
        return spk_errf(eb, SPK_EINVAL, "metric_register: '%s': at most %d label names",
                        name, SPK_PM_LABELS);
    for (size_t i = 0; i < n_labels; i++) {
        const char *l = labels[i];
        if (!spk_label_name_ok(l) || strlen(l) >= SPK_PM_LABEL)
            return spk_errf(eb, SPK_EINVAL, "metric_register: '%s': label '%s' is not a "
                            "Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, not __..., at "
                            "most %d bytes)", name, l ? l : "(null)", SPK_PM_LABEL - 1);
        if (strcmp(l, "plugin") == 0 || (type == SPK_PM_HISTOGRAM && strcmp(l, "le") == 0))
            return spk_errf(eb, SPK_EINVAL, "metric_register: '%s': label '%s' is the "
                            "host's", name, l);
        for (size_t j = 0; j < i; j++)
            if (strcmp(labels[j], l) == 0)
                return spk_errf(eb, SPK_EINVAL, "metric_register: '%s': label '%s' twice",
                                name, l);
    }
    if (type != SPK_PM_HISTOGRAM)
        return 0;
    if (n_buckets == 0 || buckets == NULL || n_buckets > SPK_PM_BUCKETS - 1)
        return spk_errf(eb, SPK_EINVAL, "metric_register: histogram '%s' needs 1 to %d "
                        "bucket bounds (+Inf is added)", name, SPK_PM_BUCKETS - 1);
    for (size_t i = 0; i < n_buckets; i++)
        if (!isfinite(buckets[i]) || (i > 0 && buckets[i] <= buckets[i - 1]))
            return spk_errf(eb, SPK_EINVAL, "metric_register: histogram '%s': bucket bounds "
                            "must be finite and increasing", name);
    return 0;
}

int spk_pm_register(spk_pmetrics *pm, uint32_t plugin, int type, const char *name,
                    const char *help, const char *const *labels, size_t n_labels,
                    const double *buckets, size_t n_buckets, spk_errbuf *eb)
{
    int rc = check_family(type, name, help, labels, n_labels, buckets, n_buckets, eb);
    if (rc != 0)
        return rc;
    uint32_t n = atomic_load_explicit(&pm->n_families, memory_order_relaxed);
    for (uint32_t i = 0; i < n; i++) {
        if (strcmp(pm->f[i].name, name) != 0)
            continue;
        if (pm->f[i].plugin != plugin)
            return spk_errf(eb, SPK_EDUPLICATE, "metric_register: '%s' is registered by "
                            "another plugin of this worker", name);
        return spk_errf(eb, SPK_EDUPLICATE, "metric_register: '%s' is registered already",
                        name);
    }
    if (n >= SPK_PM_FAMILIES)
        return spk_errf(eb, SPK_ENOMEM, "metric_register: '%s': the worker holds %d metric "
                        "families at most", name, SPK_PM_FAMILIES);
    spk_pm_family *f = &pm->f[n];
    memset(f, 0, sizeof(*f));
    snprintf(f->name, sizeof(f->name), "%s", name);
    snprintf(f->help, sizeof(f->help), "%s", help ? help : "");
    for (size_t i = 0; i < n_labels; i++)
        snprintf(f->labels[i], sizeof(f->labels[i]), "%s", labels[i]);
    f->type = (uint32_t)type;
    f->n_labels = (uint32_t)n_labels;
    f->plugin = plugin;
    if (type == SPK_PM_HISTOGRAM) {
        memcpy(f->bounds, buckets, n_buckets * sizeof(double));
        f->bounds[n_buckets] = INFINITY;
        f->n_buckets = (uint32_t)n_buckets + 1;
    }
    atomic_store_explicit(&pm->n_families, n + 1, memory_order_release);
    return (int)n;
}

spk_pm_series *spk_pm_series_get(spk_pmetrics *pm, uint32_t plugin, int family,
                                 const char *const *values, size_t n_values, spk_errbuf *eb)
{
    uint32_t nf = atomic_load_explicit(&pm->n_families, memory_order_relaxed);
    if (family < 0 || (uint32_t)family >= nf || pm->f[family].plugin != plugin) {
        spk_errf(eb, SPK_EINVAL, "metric_series: %d is not a metric this plugin registered",
                 family);
        return NULL;
    }
    const spk_pm_family *f = &pm->f[family];
    if (n_values != f->n_labels || (values == NULL && n_values > 0)) {
        spk_errf(eb, SPK_EINVAL, "metric_series: '%s' has %u labels, %zu values given",
                 f->name, f->n_labels, n_values);
        return NULL;
    }
    for (size_t i = 0; i < n_values; i++) {
        if (values[i] == NULL || strlen(values[i]) >= SPK_PM_VALUE) {
            spk_errf(eb, SPK_EINVAL, "metric_series: '%s': label value %zu is NULL or over "
                     "%d bytes", f->name, i, SPK_PM_VALUE - 1);
            return NULL;
        }
    }
    uint32_t ns = atomic_load_explicit(&pm->n_series, memory_order_relaxed);
    for (uint32_t i = 0; i < ns; i++) {
        spk_pm_series *s = &pm->s[i];
        if (s->family != (uint32_t)family)
            continue;
        size_t k = 0;
        while (k < n_values && strcmp(s->values[k], values[k]) == 0)
            k++;
        if (k == n_values)
            return s;
    }
    if (ns >= SPK_PM_SERIES) {
        spk_errf(eb, SPK_ENOMEM, "metric_series: '%s': the worker holds %d series at most",
                 f->name, SPK_PM_SERIES);
        return NULL;
    }
    spk_pm_series *s = &pm->s[ns];
    memset(s, 0, sizeof(*s));
    s->family = (uint32_t)family;
    s->type = f->type;
    s->n_buckets = f->n_buckets;
    memcpy(s->bounds, f->bounds, sizeof(s->bounds));
    for (size_t i = 0; i < n_values; i++)
        snprintf(s->values[i], sizeof(s->values[i]), "%s", values[i]);
    atomic_store_explicit(&pm->n_series, ns + 1, memory_order_release);
    return s;
}

/* ---- text buffers --------------------------------------------------------------------- */

static bool mbuf_reserve(spk_mbuf *b, size_t n)
{
    if (b->failed)
        return false;
    if (b->len + n + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (p == NULL) {
        b->failed = true;
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

void spk_mbuf_add(spk_mbuf *b, const char *s, size_t n)
{
    if (!mbuf_reserve(b, n))
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void spk_mbuf_printf(spk_mbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !mbuf_reserve(b, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void spk_mbuf_label_value(spk_mbuf *b, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"')
            spk_mbuf_printf(b, "\\%c", *v);
        else if (*v == '\n')
            spk_mbuf_add(b, "\\n", 2);
        else
            spk_mbuf_add(b, v, 1);
    }
}

/* A value as the text formats write it ("+Inf", "NaN", shortest exact digits). */
static void put_value(spk_mbuf *b, double v)
{
    if (isnan(v))
        spk_mbuf_add(b, "NaN", 3);
    else if (isinf(v))
        spk_mbuf_printf(b, "%sInf", v > 0 ? "+" : "-");
    else if (v == floor(v) && fabs(v) < 1e15)
        spk_mbuf_printf(b, "%.0f", v);
    else
        spk_mbuf_printf(b, "%.17g", v);
}

/* ---- the supervisor's aggregate ------------------------------------------------------- */

#define NV (SPK_PM_BUCKETS + 2)
#define V_COUNT SPK_PM_BUCKETS
#define V_SUM (SPK_PM_BUCKETS + 1)

typedef struct agg_series {
    char plugin[64];
    char values[SPK_PM_LABELS][SPK_PM_VALUE];
    double v[NV];
} agg_series;

typedef struct agg_family {
    spk_pm_family d; /* d.plugin unused: series carry their plugin's name */
    agg_series *s;
    size_t n, cap;
} agg_family;

typedef struct agg_hook {
    char plugin[64];
    uint64_t calls[SPK_HOOK_COUNT], errors[SPK_HOOK_COUNT], timed[SPK_HOOK_COUNT],
        sum_ns[SPK_HOOK_COUNT], bucket[SPK_HOOK_COUNT][SPK_HOOK_BUCKETS];
} agg_hook;

struct spk_metrics_base {
    agg_family *f;
    size_t nf, capf;
    agg_hook *h;
    size_t nh, caph;
    uint64_t conflicts; /* families left out: same name, different shape */
};

typedef struct spk_metrics_base agg;

spk_metrics_base *spk_metrics_base_new(void) { return calloc(1, sizeof(agg)); }

void spk_metrics_base_free(spk_metrics_base *b)
{
    if (b == NULL)
        return;
    for (size_t i = 0; i < b->nf; i++)
        free(b->f[i].s);
    free(b->f);
    free(b->h);
    free(b);
}

static bool grow(void **p, size_t *cap, size_t n, size_t size)
{
    if (n < *cap)
        return true;
    size_t nc = *cap ? *cap * 2 : 8;
    void *np = realloc(*p, nc * size);
    if (np == NULL)
        return false;
    *p = np;
    *cap = nc;
    return true;
}

static bool same_shape(const spk_pm_family *a, const spk_pm_family *b)
{
    if (a->type != b->type || a->n_labels != b->n_labels || a->n_buckets != b->n_buckets)
        return false;
    for (uint32_t i = 0; i < a->n_labels; i++)
        if (strcmp(a->labels[i], b->labels[i]) != 0)
            return false;
    return memcmp(a->bounds, b->bounds, a->n_buckets * sizeof(double)) == 0;
}

/* The family of d's name in a (created), or NULL: out of memory, or a conflict. */
static agg_family *agg_family_for(agg *a, const spk_pm_family *d)
{
    for (size_t i = 0; i < a->nf; i++) {
        if (strcmp(a->f[i].d.name, d->name) != 0)
            continue;
        if (same_shape(&a->f[i].d, d))
            return &a->f[i];
        a->conflicts++;
        return NULL;
    }
    if (!grow((void **)&a->f, &a->capf, a->nf, sizeof(agg_family)))
        return NULL;
    agg_family *f = &a->f[a->nf++];
    memset(f, 0, sizeof(*f));
    f->d = *d;
    return f;
}

static agg_series *agg_series_for(agg_family *f, const char *plugin,
                                  const char (*values)[SPK_PM_VALUE])
{
    for (size_t i = 0; i < f->n; i++) {
        agg_series *s = &f->s[i];
        if (strcmp(s->plugin, plugin) != 0)
            continue;
        uint32_t k = 0;
        while (k < f->d.n_labels && strcmp(s->values[k], values[k]) == 0)
            k++;
        if (k == f->d.n_labels)
            return s;
    }
    if (!grow((void **)&f->s, &f->cap, f->n, sizeof(agg_series)))
        return NULL;
    agg_series *s = &f->s[f->n++];
    memset(s, 0, sizeof(*s));
    snprintf(s->plugin, sizeof(s->plugin), "%s", plugin);
    memcpy(s->values, values, sizeof(s->values));
    return s;
}

static agg_hook *agg_hook_for(agg *a, const char *plugin)
{
    for (size_t i = 0; i < a->nh; i++)
        if (strcmp(a->h[i].plugin, plugin) == 0)
            return &a->h[i];
    if (!grow((void **)&a->h, &a->caph, a->nh, sizeof(agg_hook)))
        return NULL;
    agg_hook *h = &a->h[a->nh++];
    memset(h, 0, sizeof(*h));
    snprintf(h->plugin, sizeof(h->plugin), "%s", plugin);
    return h;
}

static double bits_double(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof(d));
    return d;
}

static const char *slot_plugin_name(const spk_wslot *sl, uint32_t i)
{
    uint32_t n = atomic_load_explicit(&sl->n_plugins, memory_order_acquire);
    return i < n && i < SPK_STATUS_PLUGINS ? sl->plugins[i].name : "?";
}

/* Add slot sl to a; gauges only when `gauges` (a dead worker's gauges are gone). */
static void agg_add_slot(agg *a, const spk_wslot *sl, bool gauges)
{
    const spk_pmetrics *pm = &sl->pm;
    uint32_t nf = atomic_load_explicit(&pm->n_families, memory_order_acquire);
    uint32_t ns = atomic_load_explicit(&pm->n_series, memory_order_acquire);
    if (nf > SPK_PM_FAMILIES)
        nf = SPK_PM_FAMILIES;
    if (ns > SPK_PM_SERIES)
        ns = SPK_PM_SERIES;
    for (uint32_t fi = 0; fi < nf; fi++) {
        const spk_pm_family *d = &pm->f[fi];
        if (d->type == SPK_PM_GAUGE && !gauges)
            continue;
        agg_family *f = NULL;
        for (uint32_t si = 0; si < ns; si++) {
            const spk_pm_series *s = &pm->s[si];
            if (s->family != fi)
                continue;
            if (f == NULL && (f = agg_family_for(a, d)) == NULL)
                break;
            agg_series *as = agg_series_for(f, slot_plugin_name(sl, d->plugin), s->values);
            if (as == NULL)
                break;
            if (d->type == SPK_PM_HISTOGRAM) {
                for (uint32_t k = 0; k < d->n_buckets; k++)
                    as->v[k] += (double)atomic_load_explicit(&s->v[k], memory_order_relaxed);
                as->v[V_COUNT] +=
                    (double)atomic_load_explicit(&s->v[V_COUNT], memory_order_relaxed);
                as->v[V_SUM] +=
                    bits_double(atomic_load_explicit(&s->v[V_SUM], memory_order_relaxed));
            } else {
                as->v[0] += bits_double(atomic_load_explicit(&s->v[0], memory_order_relaxed));
            }
        }
    }
    uint32_t np = atomic_load_explicit(&sl->n_plugins, memory_order_acquire);
    for (uint32_t p = 0; p < np && p < SPK_METRICS_PLUGINS; p++) {
        const spk_hookstat *row = sl->hooks.h[p];
        uint64_t any = 0;
        for (int k = 0; k < SPK_HOOK_COUNT; k++)
            any |= atomic_load_explicit(&row[k].calls, memory_order_relaxed);
        if (any == 0)
            continue;
        agg_hook *h = agg_hook_for(a, slot_plugin_name(sl, p));
        if (h == NULL)
            return;
        for (int k = 0; k < SPK_HOOK_COUNT; k++) {
            h->calls[k] += atomic_load_explicit(&row[k].calls, memory_order_relaxed);
            h->errors[k] += atomic_load_explicit(&row[k].errors, memory_order_relaxed);
            h->timed[k] += atomic_load_explicit(&row[k].timed, memory_order_relaxed);
            h->sum_ns[k] += atomic_load_explicit(&row[k].sum_ns, memory_order_relaxed);
            for (int b = 0; b < SPK_HOOK_BUCKETS; b++)
                h->bucket[k][b] += atomic_load_explicit(&row[k].bucket[b], memory_order_relaxed);
        }
    }
}

/* dst += src. */
static void agg_merge(agg *dst, const agg *src)
{
    for (size_t i = 0; i < src->nf; i++) {
        const agg_family *sf = &src->f[i];
        agg_family *f = agg_family_for(dst, &sf->d);
        for (size_t j = 0; f != NULL && j < sf->n; j++) {
            agg_series *s = agg_series_for(f, sf->s[j].plugin, sf->s[j].values);
            if (s == NULL)
                break;
            for (int k = 0; k < NV; k++)
                s->v[k] += sf->s[j].v[k];
        }
    }
    for (size_t i = 0; i < src->nh; i++) {
        agg_hook *h = agg_hook_for(dst, src->h[i].plugin);
        if (h == NULL)
            return;
        for (int k = 0; k < SPK_HOOK_COUNT; k++) {
            h->calls[k] += src->h[i].calls[k];
            h->errors[k] += src->h[i].errors[k];
            h->timed[k] += src->h[i].timed[k];
            h->sum_ns[k] += src->h[i].sum_ns[k];
            for (int b = 0; b < SPK_HOOK_BUCKETS; b++)
                h->bucket[k][b] += src->h[i].bucket[k][b];
        }
    }
    dst->conflicts += src->conflicts;
}

void spk_metrics_base_fold(spk_metrics_base *b, const spk_wslot *sl)
{
    if (b != NULL)
        agg_add_slot(b, sl, false);
}

/* ---- rendering ------------------------------------------------------------------------ */

static void put_labels(spk_mbuf *o, const char *plugin, const spk_pm_family *d,
                       const char (*values)[SPK_PM_VALUE], const char *le)
{
    spk_mbuf_add(o, "{plugin=\"", 9);
    spk_mbuf_label_value(o, plugin);
    spk_mbuf_add(o, "\"", 1);
    for (uint32_t k = 0; k < d->n_labels; k++) {
        spk_mbuf_printf(o, ",%s=\"", d->labels[k]);
        spk_mbuf_label_value(o, values[k]);
        spk_mbuf_add(o, "\"", 1);
    }
    if (le != NULL)
        spk_mbuf_printf(o, ",le=\"%s\"", le);
    spk_mbuf_add(o, "}", 1);
}

static void put_help(spk_mbuf *o, const char *name, const char *help)
{
    spk_mbuf_printf(o, "# HELP %s ", name);
    for (const char *h = help; *h; h++) {
        if (*h == '\\')
            spk_mbuf_add(o, "\\\\", 2);
        else if (*h == '\n')
            spk_mbuf_add(o, "\\n", 2);
        else
            spk_mbuf_add(o, h, 1);
    }
    spk_mbuf_add(o, "\n", 1);
}

static void render_family(const agg_family *f, spk_mbuf *o)
{
    const spk_pm_family *d = &f->d;
    if (d->help[0])
        put_help(o, d->name, d->help);
    spk_mbuf_printf(o, "# TYPE %s %s\n", d->name, type_name((int)d->type));
    for (size_t i = 0; i < f->n; i++) {
        const agg_series *s = &f->s[i];
        if (d->type != SPK_PM_HISTOGRAM) {
            spk_mbuf_add(o, d->name, strlen(d->name));
            put_labels(o, s->plugin, d, s->values, NULL);
            spk_mbuf_add(o, " ", 1);
            put_value(o, s->v[0]);
            spk_mbuf_add(o, "\n", 1);
            continue;
        }
        double cum = 0;
        for (uint32_t k = 0; k < d->n_buckets; k++) {
            char le[40];
            cum += s->v[k];
            if (isinf(d->bounds[k]))
                snprintf(le, sizeof(le), "+Inf");
            else
                snprintf(le, sizeof(le), "%.17g", d->bounds[k]);
            spk_mbuf_printf(o, "%s_bucket", d->name);
            put_labels(o, s->plugin, d, s->values, le);
            spk_mbuf_add(o, " ", 1);
            put_value(o, cum);
            spk_mbuf_add(o, "\n", 1);
        }
        spk_mbuf_printf(o, "%s_sum", d->name);
        put_labels(o, s->plugin, d, s->values, NULL);
        spk_mbuf_add(o, " ", 1);
        put_value(o, s->v[V_SUM]);
        spk_mbuf_printf(o, "\n%s_count", d->name);
        put_labels(o, s->plugin, d, s->values, NULL);
        spk_mbuf_add(o, " ", 1);
        put_value(o, s->v[V_COUNT]);
        spk_mbuf_add(o, "\n", 1);
    }
}

static void render_hooks(const agg *a, spk_mbuf *o)
{
    static const struct {
        const char *name, *help;
        size_t off;
    } counters[] = {
        {"spoke_plugin_hook_calls_total", "Calls of each plugin's hooks.",
         offsetof(agg_hook, calls)},
        {"spoke_plugin_hook_errors_total",
         "Hook calls that failed: init or health returned an error, accept_edge_payload a "
         "negative code, a traffic hook an unknown verdict.",
         offsetof(agg_hook, errors)},
    };
    for (size_t c = 0; c < sizeof(counters) / sizeof(counters[0]); c++) {
        put_help(o, counters[c].name, counters[c].help);
        spk_mbuf_printf(o, "# TYPE %s counter\n", counters[c].name);
        for (size_t i = 0; i < a->nh; i++) {
            const uint64_t *v = (const uint64_t *)((const char *)&a->h[i] + counters[c].off);
            for (int k = 0; k < SPK_HOOK_COUNT; k++) {
                if (a->h[i].calls[k] == 0)
                    continue;
                spk_mbuf_printf(o, "%s{plugin=\"", counters[c].name);
                spk_mbuf_label_value(o, a->h[i].plugin);
                spk_mbuf_printf(o, "\",hook=\"%s\"} %llu\n", spk_hook_name((enum spk_hook_id)k),
                                (unsigned long long)v[k]);
            }
        }
    }
    const char *hn = "spoke_plugin_hook_duration_seconds";
    put_help(o, hn, "Run time of a sample of hook calls (1 in metrics.hook_sample).");
    spk_mbuf_printf(o, "# TYPE %s histogram\n", hn);
    for (size_t i = 0; i < a->nh; i++) {
        const agg_hook *h = &a->h[i];
        for (int k = 0; k < SPK_HOOK_COUNT; k++) {
            if (h->calls[k] == 0)
                continue;
            uint64_t cum = 0;
            for (int b = 0; b < SPK_HOOK_BUCKETS; b++) {
                cum += h->bucket[k][b];
                spk_mbuf_printf(o, "%s_bucket{plugin=\"", hn);
                spk_mbuf_label_value(o, h->plugin);
                if (b < SPK_HOOK_BUCKETS - 1)
                    spk_mbuf_printf(o, "\",hook=\"%s\",le=\"%g\"} %llu\n",
                                    spk_hook_name((enum spk_hook_id)k),
                                    (double)hook_bounds_ns[b] / 1e9, (unsigned long long)cum);
                else
                    spk_mbuf_printf(o, "\",hook=\"%s\",le=\"+Inf\"} %llu\n",
                                    spk_hook_name((enum spk_hook_id)k), (unsigned long long)cum);
            }
            spk_mbuf_printf(o, "%s_sum{plugin=\"", hn);
            spk_mbuf_label_value(o, h->plugin);
            spk_mbuf_printf(o, "\",hook=\"%s\"} %.9f\n", spk_hook_name((enum spk_hook_id)k),
                            (double)h->sum_ns[k] / 1e9);
            spk_mbuf_printf(o, "%s_count{plugin=\"", hn);
            spk_mbuf_label_value(o, h->plugin);
            spk_mbuf_printf(o, "\",hook=\"%s\"} %llu\n", spk_hook_name((enum spk_hook_id)k),
                            (unsigned long long)h->timed[k]);
        }
    }
}

void spk_metrics_render(const spk_metrics_base *b, const spk_wslot *slots, const bool *used,
                        size_t n_slots, spk_mbuf *out)
{
    agg *a = spk_metrics_base_new();
    if (a == NULL) {
        out->failed = true;
        return;
    }
    if (b != NULL)
        agg_merge(a, b);
    for (size_t i = 0; i < n_slots; i++)
        if (used[i])
            agg_add_slot(a, &slots[i], true);
    render_hooks(a, out);
    for (size_t i = 0; i < a->nf; i++)
        render_family(&a->f[i], out);
    spk_mbuf_printf(out, "# HELP spoke_plugin_metric_conflicts Plugin metric families left "
                         "out: a name another plugin registered with another type, labels or "
                         "buckets.\n# TYPE spoke_plugin_metric_conflicts gauge\n"
                         "spoke_plugin_metric_conflicts %llu\n",
                    (unsigned long long)a->conflicts);
    spk_metrics_base_free(a);
}

/* ---- OpenMetrics ---------------------------------------------------------------------- */

/* The metric name a "# HELP name ..." or "# TYPE name ..." line names, its length. */
static size_t meta_name(const char *line, size_t len, const char **name)
{
    *name = line + 7;
    size_t n = 0;
    while (7 + n < len && line[7 + n] != ' ')
        n++;
    return n;
}

static bool is_counter_type(const char *line, size_t len)
{
    return len > 8 && strncmp(line + len - 8, " counter", 8) == 0;
}

void spk_metrics_to_openmetrics(const char *text, size_t len, spk_mbuf *out)
{
    const char *end = text + len;
    /* The counter family being copied: its samples must end in _total. */
    char counter[SPK_PM_NAME * 2] = "";
    size_t clen = 0;
    for (const char *l = text; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l));
        size_t n = nl ? (size_t)(nl - l) : (size_t)(end - l);
        const char *next = nl ? nl + 1 : end;
        if (n >= 7 && (strncmp(l, "# HELP ", 7) == 0 || strncmp(l, "# TYPE ", 7) == 0)) {
            const char *name;
            size_t nn = meta_name(l, n, &name);
            bool type_line = l[2] == 'T';
            bool counter_family = false;
            if (type_line) {
                counter_family = is_counter_type(l, n);
            } else {
                /* HELP comes before its TYPE: look at the next line. */
                const char *nl2 = memchr(next, '\n', (size_t)(end - next));
                size_t n2 = nl2 ? (size_t)(nl2 - next) : (size_t)(end - next);
                const char *name2;
                counter_family = n2 >= 7 && strncmp(next, "# TYPE ", 7) == 0 &&
                                 meta_name(next, n2, &name2) == nn &&
                                 memcmp(name2, name, nn) == 0 && is_counter_type(next, n2);
            }
            size_t base = nn;
            if (counter_family && nn > 6 && memcmp(name + nn - 6, "_total", 6) == 0)
                base = nn - 6;
            if (type_line) {
                clen = 0;
                if (counter_family && base < sizeof(counter)) {
                    memcpy(counter, name, base);
                    clen = base;
                }
            }
            spk_mbuf_add(out, l, 7);
            spk_mbuf_add(out, name, base);
            const char *rest = name + nn;
            size_t rn = (size_t)(l + n - rest);
            if (type_line && rn == 8 && strncmp(rest, " untyped", 8) == 0) {
                spk_mbuf_add(out, " unknown", 8);
            } else if (type_line) {
                spk_mbuf_add(out, rest, rn);
            } else {
                /* OpenMetrics escapes a double quote in HELP too. */
                for (size_t k = 0; k < rn; k++) {
                    if (rest[k] == '\\' && k + 1 < rn) {
                        spk_mbuf_add(out, rest + k, 2);
                        k++;
                    } else if (rest[k] == '"') {
                        spk_mbuf_add(out, "\\\"", 2);
                    } else {
                        spk_mbuf_add(out, rest + k, 1);
                    }
                }
            }
            spk_mbuf_add(out, "\n", 1);
        } else if (n > 0 && l[0] == '#') {
            /* other comments are not allowed in OpenMetrics: dropped */
        } else if (n > 0) {
            size_t sn = 0;
            while (sn < n && l[sn] != '{' && l[sn] != ' ')
                sn++;
            if (clen > 0 && sn == clen && memcmp(l, counter, clen) == 0) {
                spk_mbuf_add(out, l, sn);
                spk_mbuf_add(out, "_total", 6);
                spk_mbuf_add(out, l + sn, n - sn);
            } else {
                spk_mbuf_add(out, l, n);
            }
            spk_mbuf_add(out, "\n", 1);
        }
        l = next;
    }
    spk_mbuf_add(out, "# EOF\n", 6);
}
