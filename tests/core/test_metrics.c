/*
 * test_metrics.c -- the metrics registry (names, series, updates through the host table),
 * the supervisor's merge of slots and its base across a worker's end, the OpenMetrics
 * rewrite, and the merger's parser, on real status slots in memory.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "host.h"
#include "metrics.h"
#include "metrics_merge.h"
#include "status.h"

static spk_errbuf eb;

static void test_names(void **state)
{
    (void)state;
    assert_true(spk_metric_name_ok("a_b:c9"));
    assert_false(spk_metric_name_ok("9a"));
    assert_false(spk_metric_name_ok("a-b"));
    assert_false(spk_metric_name_ok(""));
    assert_true(spk_label_name_ok("dir"));
    assert_false(spk_label_name_ok("__x"));
    assert_false(spk_label_name_ok("a:b"));
}

static void test_register_rules(void **state)
{
    (void)state;
    spk_pmetrics *pm = calloc(1, sizeof(*pm));
    assert_non_null(pm);
    const char *dir[] = {"dir"};
    const char *le[] = {"le"};
    const char *plugin[] = {"plugin"};
    double b[] = {1, 2};
    double bad_b[] = {2, 1};
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_COUNTER, "x_total", "h", dir, 1, NULL, 0, &eb), 0);
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_COUNTER, "x", "h", NULL, 0, NULL, 0, &eb),
                     SPK_EINVAL);
    assert_non_null(strstr(eb.msg, "must end in _total"));
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_GAUGE, "bad-name", "", NULL, 0, NULL, 0, &eb),
                     SPK_EINVAL);
    assert_non_null(strstr(eb.msg, "'bad-name' is not a Prometheus metric name"));
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_GAUGE, "spoke_x", "", NULL, 0, NULL, 0, &eb),
                     SPK_EINVAL);
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_GAUGE, "g_count", "", NULL, 0, NULL, 0, &eb),
                     SPK_EINVAL);
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_GAUGE, "g", "", plugin, 1, NULL, 0, &eb),
                     SPK_EINVAL);
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_HISTOGRAM, "h", "", le, 1, b, 2, &eb),
                     SPK_EINVAL);
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_HISTOGRAM, "h", "", NULL, 0, bad_b, 2, &eb),
                     SPK_EINVAL);
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_HISTOGRAM, "h", "", NULL, 0, NULL, 0, &eb),
                     SPK_EINVAL);
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_HISTOGRAM, "h", "", NULL, 0, b, 2, &eb), 1);
    assert_int_equal(spk_pm_register(pm, 1, SPK_PM_COUNTER, "x_total", "h", dir, 1, NULL, 0, &eb),
                     SPK_EDUPLICATE);
    /* series: the right number of values, found again */
    const char *in[] = {"in"};
    spk_pm_series *s = spk_pm_series_get(pm, 0, 0, in, 1, &eb);
    assert_non_null(s);
    assert_ptr_equal(spk_pm_series_get(pm, 0, 0, in, 1, &eb), s);
    assert_null(spk_pm_series_get(pm, 0, 0, NULL, 0, &eb));
    assert_null(spk_pm_series_get(pm, 1, 0, in, 1, &eb)); /* another plugin's */
    assert_null(spk_pm_series_get(pm, 0, 7, in, 1, &eb));
    free(pm);
}

/* Two live slots and one that ended: summed by plugin and labels; the ended one's
 * counter kept, its gauge not. */
static void fill(spk_wslot *sl, const char *plugin, double c, double g)
{
    const spoke_host *h = spk_host_table();
    snprintf(sl->plugins[0].name, sizeof(sl->plugins[0].name), "%s", plugin);
    atomic_store(&sl->n_plugins, 1);
    spk_pmetrics *pm = &sl->pm;
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_COUNTER, "c_total", "C.", NULL, 0, NULL, 0, &eb), 0);
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_GAUGE, "g", "G.", NULL, 0, NULL, 0, &eb), 1);
    double b[] = {10};
    assert_int_equal(spk_pm_register(pm, 0, SPK_PM_HISTOGRAM, "h", "", NULL, 0, b, 1, &eb), 2);
    h->metric_add((spoke_metric *)spk_pm_series_get(pm, 0, 0, NULL, 0, &eb), c);
    h->metric_add((spoke_metric *)spk_pm_series_get(pm, 0, 0, NULL, 0, &eb), -5); /* ignored */
    h->metric_set((spoke_metric *)spk_pm_series_get(pm, 0, 1, NULL, 0, &eb), g);
    spoke_metric *hist = (spoke_metric *)spk_pm_series_get(pm, 0, 2, NULL, 0, &eb);
    h->metric_observe(hist, 5);
    h->metric_observe(hist, 50);
    h->metric_add(hist, 1); /* wrong kind: ignored */
    spk_stat_inc(&sl->hooks.h[0][SPK_HOOK_FROM_CLIENT].calls, (uint64_t)c);
}

static void test_merge_and_base(void **state)
{
    (void)state;
    spk_wslot *slots = calloc(3, sizeof(spk_wslot));
    assert_non_null(slots);
    fill(&slots[0], "p", 3, 1);
    fill(&slots[1], "p", 4, 2);
    fill(&slots[2], "q", 5, 7);
    spk_metrics_base *base = spk_metrics_base_new();
    spk_metrics_base_fold(base, &slots[1]); /* slot 1's worker ended */
    bool used[3] = {true, false, true};
    spk_mbuf o = {0};
    spk_metrics_render(base, slots, used, 3, &o);
    assert_false(o.failed);
    assert_non_null(strstr(o.p, "\nc_total{plugin=\"p\"} 7\n"));
    assert_non_null(strstr(o.p, "\nc_total{plugin=\"q\"} 5\n"));
    assert_non_null(strstr(o.p, "\ng{plugin=\"p\"} 1\n")); /* the ended worker's 2 is gone */
    assert_non_null(strstr(o.p, "\nh_bucket{plugin=\"p\",le=\"10\"} 2\n"));
    assert_non_null(strstr(o.p, "\nh_bucket{plugin=\"p\",le=\"+Inf\"} 4\n"));
    assert_non_null(strstr(o.p, "\nh_sum{plugin=\"p\"} 110\n"));
    assert_non_null(strstr(o.p, "spoke_plugin_hook_calls_total{plugin=\"p\",hook=\"on_traffic_"
                                "from_client\"} 7\n"));
    /* one TYPE line per family */
    char *t = strstr(o.p, "# TYPE c_total counter");
    assert_non_null(t);
    assert_null(strstr(t + 1, "# TYPE c_total counter"));
    spk_mbuf om = {0};
    spk_metrics_to_openmetrics(o.p, o.len, &om);
    assert_non_null(strstr(om.p, "# HELP c C.\n# TYPE c counter\nc_total{plugin=\"p\"} 7\n"));
    assert_non_null(strstr(om.p, "# TYPE g gauge\n"));
    assert_int_equal(strcmp(om.p + om.len - 6, "# EOF\n"), 0);
    free(om.p);
    free(o.p);
    spk_metrics_base_free(base);
    free(slots);
}

static void test_openmetrics_counter_without_total(void **state)
{
    (void)state;
    const char *in = "# TYPE reqs counter\nreqs{a=\"b\"} 1\n# HELP x say \"hi\" \\n\n"
                     "# TYPE x untyped\nx 2\n# other\n";
    spk_mbuf om = {0};
    spk_metrics_to_openmetrics(in, strlen(in), &om);
    assert_string_equal(om.p, "# TYPE reqs counter\nreqs_total{a=\"b\"} 1\n"
                              "# HELP x say \\\"hi\\\" \\n\n# TYPE x unknown\nx 2\n# EOF\n");
    free(om.p);
}

static void test_merger_parser(void **state)
{
    (void)state;
    spk_mbuf o = {0};
    const char *good = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"
                       "# HELP up_total Ups.\n# TYPE up_total counter\n"
                       "up_total{plugin=\"x\",k=\"a\\\"b\"} 3 1700000000000\n"
                       "# TYPE lat histogram\nlat_bucket{le=\"+Inf\"} 1\nlat_sum 0.5\n"
                       "lat_count 1\nbare 1e3\n";
    assert_int_equal(spk_merger_check_text("cache", good, strlen(good), &o, &eb), 0);
    assert_string_equal(o.p, "# HELP up_total Ups.\n# TYPE up_total counter\n"
                             "up_total{plugin=\"cache\",exported_plugin=\"x\",k=\"a\\\"b\"} 3\n"
                             "# TYPE lat histogram\nlat_bucket{plugin=\"cache\",le=\"+Inf\"} 1\n"
                             "lat_sum{plugin=\"cache\"} 0.5\nlat_count{plugin=\"cache\"} 1\n"
                             "# TYPE bare untyped\nbare{plugin=\"cache\"} 1e3\n");
    free(o.p);
    static const char *const bad[] = {
        "HTTP/1.0 500 Oops\r\n\r\nx 1\n",
        "x{a=\"1} 2\n",
        "x 1 2 3\n",
        "x one\n",
        "spoke_generation 1\n",
        "# TYPE x counter\nx_total 1\ny 2\nx_total 3\n",
        "# TYPE x fancy\n",
        "<html>\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(spk_merger_check_text("p", bad[i], strlen(bad[i]), NULL, &eb),
                         SPK_ECORRUPT);
}

static void test_hook_sampling(void **state)
{
    (void)state;
    assert_int_equal(spk_hook_sample_mask(64), 63);
    assert_int_equal(spk_hook_sample_mask(100), 63);
    assert_int_equal(spk_hook_sample_mask(1), 0);
    assert_true(spk_hook_sample_mask(0) == UINT64_MAX);
    spk_slot s = {0};
    spk_hookstat st = {0};
    unsigned timed = 0;
    for (int i = 0; i < 640; i++) {
        uint64_t t = spk_hook_begin(&s, &st, 63, 0, SPK_HOOK_FROM_CLIENT);
        timed += t != 0;
        spk_hook_end(&st, t);
        spk_slot_leave(&s);
    }
    assert_int_equal(atomic_load(&st.calls), 640);
    assert_int_equal(timed, 10);
    assert_int_equal(atomic_load(&st.timed), 10);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_register_rules),
        cmocka_unit_test(test_merge_and_base),
        cmocka_unit_test(test_openmetrics_counter_without_total),
        cmocka_unit_test(test_merger_parser),
        cmocka_unit_test(test_hook_sampling),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
