/*
 * bench_all.c -- `spoke-bench all`: every benchmark of docs/benchmarks.md in one command.
 *
 * Runs the subcommands one after the other, each as a child process of this binary
 * (hooks, signals, proxy, queue, uplink, hub, pg, reload, crash; each starts what it needs:
 * the echo upstream, spoked, hubd, HAProxy, SQLite, PostgreSQL and pgbouncer), with their
 * progress on stderr and
 * their tables captured. Then it writes:
 *
 *   - docs/benchmarks.md's generated section, between the markers BEGIN_MARK and
 *     END_MARK below, replaced whole on every run; everything outside them (the
 *     hand-written sections) is kept byte for byte. Without the markers the section is
 *     inserted after the title line.
 *   - the proxy suite's plot, docs/bench-proxy-latency.png and .svg (gnuplot).
 *   - docs/bench-all.json: the machine, the build, each step's command line, exit status,
 *     time and the JSON it wrote.
 *
 * The header says what was measured on: cores, CPU model, kernel, the disk under the
 * queue's directory, the load average before and after, the build type and the commit,
 * and every step's exact command line (the configurations each step writes are in its own
 * output). Each ratio in the tables is against a baseline measured inside the same step,
 * interleaved with it (see each subcommand). Budget: under 10 minutes on 2 cores.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "json.h"

#ifndef SPOKE_SOURCE_DIR
#define SPOKE_SOURCE_DIR "."
#endif
#ifndef SPOKE_BUILD_TYPE
#define SPOKE_BUILD_TYPE "unknown"
#endif

/* The section starts at a line beginning with BEGIN_PREFIX (the rest of the marker's
 * text may differ) and ends after the END_MARK line. */
#define BEGIN_PREFIX "<!-- spoke-bench all: generated section, begin"
#define BEGIN_MARK BEGIN_PREFIX " (rerun `spoke-bench all`; do not edit by hand) -->"
#define END_MARK "<!-- spoke-bench all: generated section, end -->"
#define MAX_ARGS 24
#define BUDGET_S 600

typedef struct step {
    const char *name;
    bool markdown;            /* its stdout is markdown; else it goes in a code block */
    char *argv[MAX_ARGS];     /* argv[0] = the subcommand */
    char json[300];           /* the file it writes its JSON to ("" = none) */
    char out[300];            /* its captured stdout */
    double seconds;
    int exit;
} step;

static char *xstrdup(const char *s)
{
    char *d = strdup(s);
    if (d == NULL) {
        fprintf(stderr, "spoke-bench all: out of memory\n");
        exit(1);
    }
    return d;
}

/* Read a whole file (NUL-terminated) or NULL. */
static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        if (n + 4096 > cap) {
            char *nb = realloc(buf, cap * 2);
            if (nb == NULL) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        if (r == 0)
            break;
        n += r;
    }
    fclose(f);
    if (buf != NULL) {
        buf[n] = '\0';
        if (len != NULL)
            *len = n;
    }
    return buf;
}

/* The first line of a command's output, or "?". */
static void cmd_line(const char *cmd, char *out, size_t cap)
{
    snprintf(out, cap, "?");
    FILE *p = popen(cmd, "r");
    if (p == NULL)
        return;
    if (fgets(out, (int)cap, p) == NULL)
        snprintf(out, cap, "?");
    out[strcspn(out, "\n")] = '\0';
    pclose(p);
}

static void cpu_model(char *out, size_t cap)
{
    snprintf(out, cap, "?");
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512];
    while (f != NULL && fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "model name", 10) == 0) {
            char *c = strchr(line, ':');
            if (c != NULL) {
                c += 2;
                c[strcspn(c, "\n")] = '\0';
                snprintf(out, cap, "%s", c);
            }
            break;
        }
    }
    if (f != NULL)
        fclose(f);
}

static void load_avg(char *out, size_t cap)
{
    snprintf(out, cap, "?");
    FILE *f = fopen("/proc/loadavg", "r");
    double a, b, c;
    if (f != NULL && fscanf(f, "%lf %lf %lf", &a, &b, &c) == 3)
        snprintf(out, cap, "%.2f %.2f %.2f", a, b, c);
    if (f != NULL)
        fclose(f);
}

/* "DEVICE FSTYPE (rotational|SSD/virtual, model M)" for the file system holding dir. */
static void disk_of(const char *dir, char *out, size_t cap)
{
    char cmd[700], line[512] = "";
    snprintf(cmd, sizeof(cmd), "df -PT '%s' 2>/dev/null | tail -1", dir);
    cmd_line(cmd, line, sizeof(line));
    char dev[256] = "?", fs[64] = "?";
    if (sscanf(line, "%255s %63s", dev, fs) != 2) {
        snprintf(out, cap, "?");
        return;
    }
    const char *base = strrchr(dev, '/') ? strrchr(dev, '/') + 1 : dev;
    char path[800], rot[16] = "?", model[128] = "";
    snprintf(path, sizeof(path), "cat /sys/class/block/%s/queue/rotational 2>/dev/null", base);
    cmd_line(path, rot, sizeof(rot));
    snprintf(path, sizeof(path),
             "cat /sys/class/block/%s/device/model /sys/class/block/%s/../device/model "
             "2>/dev/null | head -1", base, base);
    cmd_line(path, model, sizeof(model));
    snprintf(out, cap, "%s, %s, %s%s%s", dev, fs,
             strcmp(rot, "1") == 0 ? "rotational" : strcmp(rot, "0") == 0 ? "not rotational" : "rotational: ?",
             model[0] && strcmp(model, "?") != 0 ? ", model " : "",
             model[0] && strcmp(model, "?") != 0 ? model : "");
}

static double now_s(void) { return (double)spk_bench_now_ns() / 1e9; }

/* Run one step: this binary with s->argv, stdout into s->out, stderr shared. */
static void run_step(const char *self, step *s)
{
    char *argv[MAX_ARGS + 1];
    argv[0] = (char *)self;
    int n = 0;
    while (s->argv[n] != NULL && n < MAX_ARGS - 1) {
        argv[n + 1] = s->argv[n];
        n++;
    }
    argv[n + 1] = NULL;
    double t0 = now_s();
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        FILE *f = freopen(s->out, "w", stdout);
        if (f == NULL)
            _exit(1);
        execv(self, argv);
        fprintf(stderr, "spoke-bench all: exec %s: %s\n", self, strerror(errno));
        _exit(127);
    }
    int st = 0;
    if (pid < 0 || waitpid(pid, &st, 0) != pid)
        s->exit = 1;
    else
        s->exit = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    s->seconds = now_s() - t0;
}

static void print_cmd(FILE *f, const step *s)
{
    fprintf(f, "spoke-bench");
    for (int i = 0; s->argv[i] != NULL; i++)
        fprintf(f, " %s", s->argv[i]);
}

/* The generated section, into f. */
static void write_section(FILE *f, const step *steps, int n, const char *header,
                          const char *plot_ref, double total_s, const char *note)
{
    fprintf(f, "%s\n\n## The benchmark of record: `spoke-bench all`\n\n", BEGIN_MARK);
    if (note != NULL)
        fprintf(f, "**%s**\n\n", note);
    fputs(header, f);
    fprintf(f, "- the whole run took %.0f s (%s the 10-minute budget)\n\n", total_s,
            total_s < BUDGET_S ? "within" : "OVER");
    if (plot_ref != NULL)
        fprintf(f, "Proxy latency against offered load (open loop; solid p99, dashed p50):\n\n"
                   "![proxy latency against offered load](%s.svg)\n\n"
                   "(also [PNG](%s.png); data and gnuplot script beside them: `%s.dat`, "
                   "`%s.gp`)\n\n", plot_ref, plot_ref, plot_ref, plot_ref);
    for (int i = 0; i < n; i++) {
        const step *s = &steps[i];
        fprintf(f, "### %s\n\n`", s->name);
        print_cmd(f, s);
        fprintf(f, "` — %.0f s, exit %d%s\n\n", s->seconds, s->exit,
                s->exit == 0 ? "" : s->exit == 2 ? " (finished, but saw errors: see below)"
                                                 : " (FAILED)");
        size_t len = 0;
        char *text = slurp(s->out, &len);
        if (text == NULL || len == 0) {
            fprintf(f, "(no output)\n\n");
        } else if (s->markdown) {
            fputs(text, f);
            fprintf(f, "%s\n", text[len - 1] == '\n' ? "" : "\n");
        } else {
            fprintf(f, "```text\n%s%s```\n\n", text, text[len - 1] == '\n' ? "" : "\n");
        }
        free(text);
    }
    fprintf(f, "%s\n", END_MARK);
}

/* Replace the generated section of `docs` with section[0..len), keeping the rest. */
static int update_docs(const char *docs, const char *section, size_t len)
{
    size_t dlen = 0;
    char *old = slurp(docs, &dlen);
    if (old == NULL) {
        old = xstrdup("# Benchmarks\n");
        dlen = strlen(old);
    }
    char tmp[700];
    snprintf(tmp, sizeof(tmp), "%s.tmp", docs);
    FILE *f = fopen(tmp, "w");
    if (f == NULL) {
        fprintf(stderr, "spoke-bench all: %s: %s\n", tmp, strerror(errno));
        free(old);
        return -1;
    }
    char *b = strstr(old, BEGIN_PREFIX), *e = b ? strstr(b, END_MARK) : NULL;
    if (b != NULL && e != NULL) {
        e += strlen(END_MARK);
        if (*e == '\n')
            e++;
        fwrite(old, 1, (size_t)(b - old), f);
        fwrite(section, 1, len, f);
        fputs(e, f);
    } else {
        /* after the title line (and its blank line) */
        char *nl = strchr(old, '\n');
        size_t head = nl ? (size_t)(nl - old) + 1 : dlen;
        fwrite(old, 1, head, f);
        fputs("\n", f);
        fwrite(section, 1, len, f);
        fputs("\n", f);
        const char *rest = old + head;
        while (*rest == '\n')
            rest++;
        fputs(rest, f);
    }
    free(old);
    if (fclose(f) != 0 || rename(tmp, docs) != 0) {
        fprintf(stderr, "spoke-bench all: writing %s: %s\n", docs, strerror(errno));
        return -1;
    }
    return 0;
}

static void write_json(const char *path, const step *steps, int n, const char *when,
                       const char *commit, const char *machine_json, double total_s)
{
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        fprintf(stderr, "spoke-bench all: %s: %s\n", path, strerror(errno));
        return;
    }
    fprintf(f, "{\"date\":\"%s\",\"commit\":", when);
    spk_bench_json_string(f, commit);
    fprintf(f, ",\"build_type\":");
    spk_bench_json_string(f, SPOKE_BUILD_TYPE);
    fprintf(f, ",\"machine\":%s,\"seconds\":%.1f,\"steps\":[", machine_json, total_s);
    for (int i = 0; i < n; i++) {
        const step *s = &steps[i];
        fprintf(f, "%s{\"name\":\"%s\",\"argv\":[", i ? "," : "", s->name);
        for (int k = 0; s->argv[k] != NULL; k++) {
            fprintf(f, "%s", k ? "," : "");
            spk_bench_json_string(f, s->argv[k]);
        }
        fprintf(f, "],\"seconds\":%.1f,\"exit\":%d,\"result\":", s->seconds, s->exit);
        size_t len = 0;
        char *j = s->json[0] ? slurp(s->json, &len) : NULL;
        /* Only well-formed JSON goes in (core/base/json.h's check); else null. */
        if (j != NULL && len > 0 && spk_json_valid(j, len))
            fputs(j, f);
        else
            fputs("null", f);
        free(j);
        fputs("}", f);
    }
    fprintf(f, "]}\n");
    fclose(f);
}

static void usage(FILE *f)
{
    fprintf(f, "  all [--docs FILE] [--plot PREFIX] [--json FILE] [--queue-dir DIR] [--quick]\n"
               "      [--only hooks,signals,proxy,queue,uplink,hub,pg,reload,crash] [--note TEXT]\n"
               "      every benchmark (each starts what it needs), progress on stderr, then\n"
               "      the generated section of FILE (default: the source tree's\n"
               "      docs/benchmarks.md, between its markers; the rest is kept), the plot\n"
               "      PREFIX.png/.svg (docs/bench-proxy-latency) and FILE.json of every\n"
               "      figure (docs/bench-all.json). --quick: short runs, for a smoke test.\n"
               "      Under 10 minutes on 2 cores.\n");
}

void spk_bench_all_usage(FILE *f) { usage(f); }

static bool wanted(const char *only, const char *name)
{
    if (only == NULL)
        return true;
    size_t n = strlen(name);
    for (const char *p = only; (p = strstr(p, name)) != NULL; p += n)
        if ((p == only || p[-1] == ',') && (p[n] == '\0' || p[n] == ','))
            return true;
    return false;
}

int spk_bench_all(int argc, char **argv)
{
    const char *docs = SPOKE_SOURCE_DIR "/docs/benchmarks.md";
    const char *plot = SPOKE_SOURCE_DIR "/docs/bench-proxy-latency";
    const char *json = SPOKE_SOURCE_DIR "/docs/bench-all.json";
    const char *qdir = "/var/tmp", *only = NULL, *note = NULL;
    bool quick = false;
    static const struct option opts[] = {
        {"docs", required_argument, NULL, 'd'},      {"plot", required_argument, NULL, 'p'},
        {"json", required_argument, NULL, 'j'},      {"queue-dir", required_argument, NULL, 'q'},
        {"quick", no_argument, NULL, 'Q'},           {"only", required_argument, NULL, 'o'},
        {"note", required_argument, NULL, 'n'},      {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'd': docs = optarg; break;
        case 'p': plot = optarg; break;
        case 'j': json = optarg; break;
        case 'q': qdir = optarg; break;
        case 'Q': quick = true; break;
        case 'o': only = optarg; break;
        case 'n': note = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 1;
        }
    }
    char bin[512], self[600];
    if (spk_bench_self_dir(bin, sizeof(bin)) != 0) {
        fprintf(stderr, "spoke-bench all: cannot find my own directory\n");
        return 1;
    }
    snprintf(self, sizeof(self), "%s/spoke-bench", bin);
    char tmp[] = "/tmp/spoke-bench-all.XXXXXX";
    if (mkdtemp(tmp) == NULL) {
        fprintf(stderr, "spoke-bench all: mkdtemp: %s\n", strerror(errno));
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);

    /* The steps and their exact arguments. */
    static step steps[10];
    int n = 0;
#define STEP(nm, md) (steps[n] = (step){.name = nm, .markdown = md}, &steps[n++])
#define JSON_ARG(s, flag)                                                                  \
    do {                                                                                   \
        snprintf((s)->json, sizeof((s)->json), "%s/%s.json", tmp, (s)->name);              \
        (s)->argv[k++] = flag;                                                             \
        (s)->argv[k++] = (s)->json;                                                        \
    } while (0)
    step *s;
    int k;
    char plugin[600];
    snprintf(plugin, sizeof(plugin), "%s/plugins/passthrough.so", bin);
    if (wanted(only, "hooks")) {
        s = STEP("hooks", true);
        k = 0;
        s->argv[k++] = "hooks";
        s->argv[k++] = "--plugin";
        s->argv[k++] = plugin;
        if (quick) {
            s->argv[k++] = "--iterations";
            s->argv[k++] = "100000";
        }
    }
    if (wanted(only, "signals")) {
        /* a plugin's signal through the policies (bench_signals.c), in-process */
        s = STEP("signals", true);
        k = 0;
        s->argv[k++] = "signals";
        if (quick) {
            s->argv[k++] = "--iterations";
            s->argv[k++] = "10000";
            s->argv[k++] = "--repetitions";
            s->argv[k++] = "3";
        }
    }
    if (wanted(only, "proxy")) {
        s = STEP("proxy", true);
        k = 0;
        s->argv[k++] = "proxy";
        s->argv[k++] = "--rounds";
        s->argv[k++] = quick ? "1" : "3";
        s->argv[k++] = "--duration";
        s->argv[k++] = quick ? "500ms" : "3s";
        s->argv[k++] = "--warmup";
        s->argv[k++] = quick ? "200ms" : "500ms";
        s->argv[k++] = "--rate-duration";
        s->argv[k++] = quick ? "500ms" : "3s";
        if (quick) {
            s->argv[k++] = "--rates";
            s->argv[k++] = "20,60";
        }
        s->argv[k++] = "--plot";
        s->argv[k++] = (char *)plot;
        JSON_ARG(s, "--json");
    }
    if (wanted(only, "queue")) {
        s = STEP("queue", true);
        k = 0;
        s->argv[k++] = "queue";
        s->argv[k++] = "--dir";
        s->argv[k++] = (char *)qdir;
        if (quick) {
            s->argv[k++] = "--ops";
            s->argv[k++] = "2000";
            s->argv[k++] = "--always-ops";
            s->argv[k++] = "30";
            s->argv[k++] = "--hot-ops";
            s->argv[k++] = "4000";
        }
        JSON_ARG(s, "--json");
    }
    if (wanted(only, "uplink")) {
        s = STEP("uplink", false);
        k = 0;
        s->argv[k++] = "uplink";
        if (quick) {
            s->argv[k++] = "--edges";
            s->argv[k++] = "1";
        }
        s->argv[k++] = "--duration";
        s->argv[k++] = quick ? "1s" : "5s";
        s->argv[k++] = "--warmup";
        s->argv[k++] = quick ? "500ms" : "1s";
        JSON_ARG(s, "--json");
    }
    if (wanted(only, "hub")) {
        s = STEP("hub", false);
        k = 0;
        s->argv[k++] = "hub";
        s->argv[k++] = "--duration";
        s->argv[k++] = quick ? "1s" : "5s";
        s->argv[k++] = "--warmup";
        s->argv[k++] = quick ? "500ms" : "1s";
        JSON_ARG(s, "--json");
    }
    if (wanted(only, "pg")) {
        /* pgbench through pgbouncer and spoked (bench_pg.c); its own PostgreSQL */
        s = STEP("pg", false);
        k = 0;
        s->argv[k++] = "pg";
        s->argv[k++] = "--duration";
        s->argv[k++] = quick ? "1s" : "5s";
    }
    if (wanted(only, "reload")) {
        s = STEP("reload", true);
        k = 0;
        s->argv[k++] = "reload";
        if (quick) {
            s->argv[k++] = "--reloads";
            s->argv[k++] = "2";
        }
        JSON_ARG(s, "--json");
    }
    if (wanted(only, "crash")) {
        s = STEP("crash", true);
        k = 0;
        s->argv[k++] = "crash";
        s->argv[k++] = "--crashes";
        s->argv[k++] = quick ? "10" : "1000";
        s->argv[k++] = "--reloads";
        s->argv[k++] = quick ? "2" : "100";
        s->argv[k++] = "--max-time";
        s->argv[k++] = quick ? "20s" : "120s";
        JSON_ARG(s, "--json");
    }
    for (int i = 0; i < n; i++)
        snprintf(steps[i].out, sizeof(steps[i].out), "%s/%s.out", tmp, steps[i].name);

    /* The machine, before. */
    char cpu[256], kernel[300], disk[600], load0[64], load1[64], commit[64], when[64];
    cpu_model(cpu, sizeof(cpu));
    struct utsname u;
    snprintf(kernel, sizeof(kernel), "%s", uname(&u) == 0 ? u.release : "?");
    disk_of(qdir, disk, sizeof(disk));
    load_avg(load0, sizeof(load0));
    char cmd[700];
    snprintf(cmd, sizeof(cmd), "git -C '%s' rev-parse --short HEAD 2>/dev/null", SPOKE_SOURCE_DIR);
    cmd_line(cmd, commit, sizeof(commit));
    snprintf(cmd, sizeof(cmd),
             "git -C '%s' status --porcelain --untracked-files=no 2>/dev/null | head -1",
             SPOKE_SOURCE_DIR);
    char dirty[256] = "";
    cmd_line(cmd, dirty, sizeof(dirty));
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(when, sizeof(when), "%Y-%m-%d %H:%M UTC", &tm);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    fprintf(stderr, "spoke-bench all: %d steps on %ld cores (%s), Linux %s, %s build; load "
                    "average %s\n", n, cores, cpu, kernel, SPOKE_BUILD_TYPE, load0);

    double t0 = now_s();
    for (int i = 0; i < n; i++) {
        fprintf(stderr, "\nspoke-bench all: [%d/%d] %s (%.0f s so far): ", i + 1, n,
                steps[i].name, now_s() - t0);
        print_cmd(stderr, &steps[i]);
        fprintf(stderr, "\n");
        run_step(self, &steps[i]);
        fprintf(stderr, "spoke-bench all: [%d/%d] %s done in %.1f s, exit %d\n", i + 1, n,
                steps[i].name, steps[i].seconds, steps[i].exit);
    }
    double total = now_s() - t0;
    load_avg(load1, sizeof(load1));

    /* The header of the generated section. */
    char header[4096];
    snprintf(header, sizeof(header),
             "Run of %s, commit %s%s.\n\n"
             "- machine: %ld cores online, %s, Linux %s; disk under the queue's `--dir %s`: %s\n"
             "- load average (1, 5, 15 min) %s before the run, %s after%s\n"
             "- build: %s (`%s`)\n"
             "- command: `spoke-bench all`; each step's exact command line is under its "
             "heading, and the configurations the steps write for spoked, hubd and HAProxy "
             "are in their outputs\n",
             when, commit, dirty[0] && strcmp(dirty, "?") != 0 ? " (with uncommitted changes)" : "",
             cores, cpu, kernel, qdir, disk, load0, load1,
             quick ? "\n- **--quick: short smoke-test runs, not figures of record**" : "",
             SPOKE_BUILD_TYPE, bin);
    char *section = NULL;
    size_t slen = 0;
    FILE *mf = open_memstream(&section, &slen);
    if (mf == NULL) {
        fprintf(stderr, "spoke-bench all: out of memory\n");
        return 1;
    }
    /* The plot is referred to relative to the docs file when they share a directory. */
    const char *plot_ref = NULL;
    char pref[600];
    bool have_plot = false;
    for (int i = 0; i < n; i++)
        if (strcmp(steps[i].name, "proxy") == 0)
            have_plot = true;
    if (have_plot) {
        char ddir[600], pdir[600];
        snprintf(ddir, sizeof(ddir), "%s", docs);
        snprintf(pdir, sizeof(pdir), "%s", plot);
        char *a = strrchr(ddir, '/'), *b = strrchr(pdir, '/');
        if (a)
            *a = '\0';
        else
            snprintf(ddir, sizeof(ddir), ".");
        if (b)
            *b = '\0';
        else
            snprintf(pdir, sizeof(pdir), ".");
        const char *pbase = strrchr(plot, '/') ? strrchr(plot, '/') + 1 : plot;
        snprintf(pref, sizeof(pref), "%s", strcmp(ddir, pdir) == 0 ? pbase : plot);
        plot_ref = pref;
    }
    write_section(mf, steps, n, header, plot_ref, total, note);
    fclose(mf);
    fwrite(section, 1, slen, stdout);

    char machine[2048];
    FILE *jm = fmemopen(machine, sizeof(machine), "w");
    if (jm != NULL) {
        fprintf(jm, "{\"cores\":%ld,\"cpu\":", cores);
        spk_bench_json_string(jm, cpu);
        fprintf(jm, ",\"kernel\":");
        spk_bench_json_string(jm, kernel);
        fprintf(jm, ",\"disk\":");
        spk_bench_json_string(jm, disk);
        fprintf(jm, ",\"load_before\":\"%s\",\"load_after\":\"%s\"}", load0, load1);
        fputc('\0', jm);
        fclose(jm);
    } else {
        snprintf(machine, sizeof(machine), "null");
    }
    int rc = 0;
    if (docs[0] != '\0' && strcmp(docs, "-") != 0 && update_docs(docs, section, slen) != 0)
        rc = 1;
    if (json[0] != '\0' && strcmp(json, "-") != 0)
        write_json(json, steps, n, when, commit, machine, total);
    free(section);
    for (int i = 0; i < n; i++)
        if (steps[i].exit != 0 && rc == 0)
            rc = steps[i].exit == 1 ? 1 : 2;
    fprintf(stderr, "\nspoke-bench all: %d steps in %.0f s (%s the %d s budget); wrote %s, "
                    "%s.png/.svg, %s\n", n, total, total < BUDGET_S ? "within" : "OVER",
            BUDGET_S, docs, plot, json);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmp);
    if (system(cmd) != 0)
        fprintf(stderr, "spoke-bench all: could not remove %s\n", tmp);
    return rc;
}
