/*
 * cli.c -- the command line of spoked and hubd, which differ only in their role.
 *
 *   PROG -c FILE                   serve: a supervisor and its workers (supervisor.h)
 *   spoked -c FILE --single-process  serve in this one process, unsupervised (debugging)
 *   PROG --check-config FILE       validate FILE, print the effective config, exit 0/1
 *   PROG status -c FILE            print the running instance's status
 *   PROG reload -c FILE            SIGHUP the running instance (through its pid file)
 *   PROG --version
 *
 * `PROG --worker ...` (and spoked's `--uplink ...`) is how the supervisor starts its
 * children; it is not for operators. A spoked worker runs the proxy (worker.h), a hubd
 * worker the gRPC server and the control plugins (hub.h).
 */
#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <stdbool.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cli.h"
#include "config.h"
#include "hub.h"
#include "json.h"
#include "kv.h"
#include "kv_conf.h"
#include "log.h"
#include "net.h"
#include "pin.h"
#include "privs.h"
#include "status.h"
#include "supervisor.h"
#include "uplink.h"
#include "worker.h"

static spoke_role role;
static const char *prog = "spoked";

static void usage(FILE *f)
{
    fprintf(f, "usage: %s -c FILE%s   serve with the config in FILE\n"
               "       %s --check-config FILE          validate FILE, print the effective config\n"
               "       %s status -c FILE               status of the running instance\n"
               "       %s reload -c FILE               reload the running instance (SIGHUP)\n"
               "%s"
               "       %s --version\n",
            prog, role == SPOKE_ROLE_EDGE ? " [--single-process]" : "", prog, prog, prog,
            role == SPOKE_ROLE_CONTROL
                ? "       hubd kv get PLUGIN_ID KEY -c FILE    a control plugin's KV entry\n"
                  "       hubd kv scan PLUGIN_ID [PREFIX] -c FILE\n"
                : "",
            prog);
}

static int load(const char *path, spk_config **cfg, spk_errbuf *eb)
{
    return spk_config_load_role(path, role, cfg, eb);
}

static int check_config(const char *path)
{
    spk_config *cfg;
    spk_errbuf eb;
    if (load(path, &cfg, &eb) != 0) {
        fprintf(stderr, "%s: %s\n", prog, eb.msg);
        return 1;
    }
    spk_config_dump(cfg, stdout);
    printf("# %s: configuration OK\n", path);
    spk_config_free(cfg);
    return 0;
}

static int single_process(const char *path)
{
    spk_config *cfg;
    spk_errbuf eb;
    if (load(path, &cfg, &eb) != 0) {
        fprintf(stderr, "%s: %s\n", prog, eb.msg);
        return 1;
    }
    spk_log_set_level(cfg->log_level);
    spk_log_set_format((spk_log_format)cfg->log_format);
    int *fds = calloc(cfg->n_listen ? cfg->n_listen : 1, sizeof(int));
    int rc = fds ? spk_listen_all(cfg->listen, cfg->n_listen, cfg->backlog, fds, &eb)
                 : spk_errf(&eb, SPK_ENOMEM, "out of memory");
    if (rc == 0)
        rc = spk_privs_apply(cfg, &eb); /* listeners bound: the plugins run as `user:` */
    if (rc == 0) {
        spk_worker_opts opts = {.listen_fds = fds, .n_listen = cfg->n_listen};
        rc = spk_worker_run(cfg, &opts, &eb);
        for (size_t i = 0; i < cfg->n_listen; i++)
            close(fds[i]);
    }
    if (rc != 0)
        spk_error("%s", eb.msg);
    free(fds);
    spk_config_free(cfg);
    return rc == 0 ? 0 : 1;
}

/* Worker and uplink mode: argv as built by the supervisor's spk_sup_exec(). */
static int worker_main(int argc, char **argv)
{
    bool uplink = strcmp(argv[1], "--uplink") == 0;
    int id = 0, gen = 0, cfg_fd = -1, st_fd = -1, slot = -1;
    const char *cfg_name = NULL;
    int fds[SPK_LISTEN_MAX];
    size_t n_fds = 0;
    const char *quarantine[SPK_STATUS_PLUGINS];
    size_t n_q = 0;
    int *pin_fds = calloc((size_t)argc, sizeof(int));
    char **pin_paths = calloc((size_t)argc, sizeof(char *));
    size_t n_pins = 0;
    if (pin_fds == NULL || pin_paths == NULL) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return 2;
    }
    bool too_many = false; /* never cut short: the config refuses more than the caps */
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (strcmp(k, "--worker") == 0 || strcmp(k, "--uplink") == 0)
            id = atoi(v);
        else if (strcmp(k, "--gen") == 0)
            gen = atoi(v);
        else if (strcmp(k, "--config-fd") == 0)
            cfg_fd = atoi(v);
        else if (strcmp(k, "--config-name") == 0)
            cfg_name = v;
        else if (strcmp(k, "--status-fd") == 0)
            st_fd = atoi(v);
        else if (strcmp(k, "--slot") == 0)
            slot = atoi(v);
        else if (strcmp(k, "--listen-fd") == 0 && n_fds < SPK_LISTEN_MAX)
            fds[n_fds++] = atoi(v);
        else if (strcmp(k, "--quarantine") == 0 && n_q < SPK_STATUS_PLUGINS)
            quarantine[n_q++] = v;
        else if (strcmp(k, "--pin") == 0 && strchr(v, ':') != NULL) {
            pin_fds[n_pins] = atoi(v);
            pin_paths[n_pins++] = strchr(v, ':') + 1;
        } else if (strcmp(k, "--listen-fd") == 0 || strcmp(k, "--quarantine") == 0)
            too_many = true;
    }
    char tag[48];
    if (uplink)
        snprintf(tag, sizeof(tag), "%s uplink", prog);
    else
        snprintf(tag, sizeof(tag), "%s worker %d.%d", prog, gen, id);
    spk_log_set_tag(tag);
    spk_errbuf eb;
    spk_status *st;
    if (too_many || cfg_fd < 0 || st_fd < 0 || slot < 0 || slot >= SPK_STATUS_SLOTS ||
        spk_status_map(st_fd, &st, &eb) != 0) {
        fprintf(stderr, "%s: bad worker arguments (this mode is for the supervisor)\n", prog);
        free(pin_fds);
        free(pin_paths);
        return 2;
    }
    close(st_fd);
    spk_wslot *ws = &st->slots[slot];
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", cfg_fd);
    spk_config *cfg;
    int rc = load(path, &cfg, &eb);
    bool loaded = rc == 0;
    close(cfg_fd);
    if (rc == 0 && cfg_name != NULL) {
        char *n = strdup(cfg_name);
        if (n != NULL) {
            free(cfg->file);
            cfg->file = n;
        }
    }
    /* A worker runs the generation's plugin files (pin.h), as `user:` (privs.h). */
    if (rc == 0 && !uplink)
        rc = spk_pins_apply(cfg, pin_fds, pin_paths, n_pins, &eb);
    if (rc == 0 && !uplink)
        rc = spk_privs_apply(cfg, &eb);
    free(pin_fds);
    free(pin_paths);
    if (rc != 0 && loaded)
        spk_config_free(cfg);
    if (rc == 0 && uplink) {
        spk_log_set_level(cfg->log_level);
        spk_log_set_format((spk_log_format)cfg->log_format);
        rc = spk_uplink_run(cfg, ws, &eb);
        spk_config_free(cfg);
    } else if (rc == 0 && role == SPOKE_ROLE_CONTROL) {
        spk_log_set_level(cfg->log_level);
        spk_log_set_format((spk_log_format)cfg->log_format);
        spk_hub_opts opts = {.listen_fds = fds, .n_listen = n_fds, .wslot = ws,
                             .quarantine = quarantine, .n_quarantine = n_q, .index = id};
        rc = spk_hub_worker_run(cfg, &opts, &eb);
        spk_config_free(cfg);
    } else if (rc == 0) {
        spk_log_set_level(cfg->log_level);
        spk_log_set_format((spk_log_format)cfg->log_format);
        spk_worker_opts opts = {.listen_fds = fds, .n_listen = n_fds, .wslot = ws,
                                .quarantine = quarantine, .n_quarantine = n_q};
        rc = spk_worker_run(cfg, &opts, &eb);
        spk_config_free(cfg);
    }
    int code = 0;
    if (rc == SPK_EBUSY) {
        code = SPK_EXIT_HEALTH;
    } else if (rc != 0) {
        snprintf(ws->reason, sizeof(ws->reason), "%s", eb.msg);
        spk_error("%s", eb.msg);
        code = SPK_EXIT_START;
    }
    spk_status_unmap(st);
    return code;
}

/* The run_dir of the config at `path`, for status/reload. */
static int run_dir_of(const char *path, char *out, size_t cap)
{
    spk_config *cfg;
    spk_errbuf eb;
    if (load(path, &cfg, &eb) != 0) {
        fprintf(stderr, "%s: %s\n", prog, eb.msg);
        return -1;
    }
    snprintf(out, cap, "%s", cfg->run_dir);
    spk_config_free(cfg);
    return 0;
}

static int status_main(const char *path)
{
    char dir[256];
    if (run_dir_of(path, dir, sizeof(dir)) != 0)
        return 1;
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    if ((size_t)snprintf(un.sun_path, sizeof(un.sun_path), "%s/%s.sock", dir, prog) >=
        sizeof(un.sun_path)) {
        fprintf(stderr, "%s: run_dir %s is too long for a unix socket path\n", prog, dir);
        return 1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&un, sizeof(un)) != 0) {
        fprintf(stderr, "%s: cannot reach %s: %s (is %s running with this config?)\n", prog,
                un.sun_path, strerror(errno), prog);
        if (fd >= 0)
            close(fd);
        return 1;
    }
    /* One command, then the end of the request: the answer ends when the socket does. */
    static const char cmd[] = "status\n";
    if (write(fd, cmd, sizeof(cmd) - 1) != (ssize_t)(sizeof(cmd) - 1) ||
        shutdown(fd, SHUT_WR) != 0) {
        fprintf(stderr, "%s: %s: %s\n", prog, un.sun_path, strerror(errno));
        close(fd);
        return 1;
    }
    char buf[8192];
    ssize_t n;
    while ((n = read(fd, buf, sizeof(buf))) > 0)
        fwrite(buf, 1, (size_t)n, stdout);
    close(fd);
    return 0;
}

/* Whether `pid` is a supervisor of this program for the config at `path`: its executable
 * is ours (also after an upgrade replaced the file: " (deleted)"), it is not one of its
 * children (argv[1] is not --worker or --uplink), and its -c argument names the same file,
 * resolved against its own working directory. So a pid file that names another process
 * (a stale file after pid reuse, or one a user could write) never gets it a SIGHUP. */
static bool is_our_supervisor(int pid, const char *path)
{
    char link[64], exe[PATH_MAX], self[PATH_MAX];
    snprintf(link, sizeof(link), "/proc/%d/exe", pid);
    ssize_t n = readlink(link, exe, sizeof(exe) - 1);
    ssize_t m = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0 || m <= 0)
        return false;
    exe[n] = self[m] = '\0';
    static const char deleted[] = " (deleted)";
    size_t dl = sizeof(deleted) - 1;
    if ((size_t)n > dl && strcmp(exe + n - dl, deleted) == 0)
        exe[n - dl] = '\0';
    if (strcmp(exe, self) != 0)
        return false;
    char argv[8192];
    snprintf(link, sizeof(link), "/proc/%d/cmdline", pid);
    int fd = open(link, O_RDONLY | O_CLOEXEC);
    n = fd >= 0 ? read(fd, argv, sizeof(argv) - 1) : -1;
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        return false;
    argv[n] = '\0';
    const char *cfg = NULL;
    int i = 0;
    for (const char *a = argv; a < argv + n; a += strlen(a) + 1, i++) {
        if (i == 1 && (strcmp(a, "--worker") == 0 || strcmp(a, "--uplink") == 0))
            return false;
        if ((strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0) && a + strlen(a) + 1 < argv + n)
            cfg = a + strlen(a) + 1;
    }
    if (cfg == NULL)
        return false;
    char theirs[PATH_MAX + 64], a[PATH_MAX], b[PATH_MAX];
    if (cfg[0] == '/')
        snprintf(theirs, sizeof(theirs), "%s", cfg);
    else
        snprintf(theirs, sizeof(theirs), "/proc/%d/cwd/%s", pid, cfg);
    return realpath(theirs, a) != NULL && realpath(path, b) != NULL && strcmp(a, b) == 0;
}

static int reload_main(const char *path)
{
    char dir[256], pidfile[300];
    if (run_dir_of(path, dir, sizeof(dir)) != 0)
        return 1;
    snprintf(pidfile, sizeof(pidfile), "%s/%s.pid", dir, prog);
    FILE *f = fopen(pidfile, "r");
    int pid = 0;
    if (f == NULL || fscanf(f, "%d", &pid) != 1 || pid <= 0) {
        fprintf(stderr, "%s: cannot read %s: %s (is %s running with this config?)\n", prog,
                pidfile, f ? "no pid in it" : strerror(errno), prog);
        if (f)
            fclose(f);
        return 1;
    }
    fclose(f);
    if (!is_our_supervisor(pid, path)) {
        fprintf(stderr, "%s: %s names pid %d, which is not a %s supervisor for %s; not "
                "signalling it (a stale pid file?)\n", prog, pidfile, pid, prog, path);
        return 1;
    }
    if (kill(pid, SIGHUP) != 0) {
        fprintf(stderr, "%s: cannot signal pid %d: %s\n", prog, pid, strerror(errno));
        return 1;
    }
    printf("reload signalled to %s pid %d; `%s status -c %s` shows the outcome\n", prog, pid,
           prog, path);
    return 0;
}

/* hubd kv get ID KEY | hubd kv scan ID [PREFIX]: read a control plugin's KV namespace in
 * the hub's store (a read transaction; the running hubd is not disturbed). */
static int print_entry(void *arg, const void *key, size_t klen, const void *val, size_t vlen)
{
    (void)arg;
    printf("%.*s\t", (int)klen, (const char *)key);
    const uint8_t *v = val;
    bool text = spk_utf8_valid(val, vlen);
    for (size_t i = 0; text && i < vlen; i++)
        text = v[i] >= 0x20 || v[i] == '\t' || v[i] == '\n';
    if (text)
        printf("%.*s\n", (int)vlen, (const char *)val);
    else {
        for (size_t i = 0; i < vlen; i++)
            printf("%02x", v[i]);
        printf("  (%zu bytes)\n", vlen);
    }
    return 0;
}

static int kv_main(const char *path, char **args, int n)
{
    bool get = n == 3 && strcmp(args[0], "get") == 0;
    bool scan = (n == 2 || n == 3) && strcmp(args[0], "scan") == 0;
    char *end;
    unsigned long id = n >= 2 ? strtoul(args[1], &end, 10) : 0;
    if ((!get && !scan) || n < 2 || *end != '\0' || id == 0 || id > UINT32_MAX) {
        fprintf(stderr, "usage: hubd kv get PLUGIN_ID KEY -c FILE\n"
                        "       hubd kv scan PLUGIN_ID [PREFIX] -c FILE\n");
        return 2;
    }
    spk_config *cfg;
    spk_errbuf eb;
    if (load(path, &cfg, &eb) != 0) {
        fprintf(stderr, "%s: %s\n", prog, eb.msg);
        return 1;
    }
    spk_kv *kv = NULL;
    spk_kv_txn *t = NULL;
    int rc = spk_kv_conf_open(cfg, SPOKE_ROLE_CONTROL, &kv, &eb);
    if (rc == 0)
        rc = spk_kv_begin(kv, NULL, false, &t, &eb);
    if (rc == 0 && get) {
        const void *v;
        size_t vlen;
        rc = spk_kv_get(t, (uint32_t)id, args[2], strlen(args[2]), &v, &vlen, &eb);
        if (rc == 0)
            print_entry(NULL, args[2], strlen(args[2]), v, vlen);
    } else if (rc == 0) {
        const char *pre = n == 3 ? args[2] : "";
        rc = spk_kv_scan(t, (uint32_t)id, pre, strlen(pre), NULL, 0, 0, print_entry, NULL, NULL,
                         NULL, &eb);
    }
    if (rc != 0)
        fprintf(stderr, "%s: %s\n", prog, rc == SPK_ENOENT ? "no such key" : eb.msg);
    if (t != NULL)
        spk_kv_abort(t);
    spk_kv_close(kv);
    spk_config_free(cfg);
    return rc == 0 ? 0 : 1;
}

int spk_cli_main(int argc, char **argv, spoke_role r)
{
    role = r;
    prog = r == SPOKE_ROLE_CONTROL ? "hubd" : "spoked";
    const char *config_path = NULL;
    const char *cmd = NULL;
    char **kv_args = NULL;
    int n_kv_args = 0;
    int single = 0;
    if (argc > 1 && (strcmp(argv[1], "--worker") == 0 ||
                     (role == SPOKE_ROLE_EDGE && strcmp(argv[1], "--uplink") == 0)))
        return worker_main(argc, argv);
    for (int i = 1; i < argc; i++) {
        if ((strcmp(argv[i], "-c") == 0 || strcmp(argv[i], "--config") == 0) && i + 1 < argc) {
            config_path = argv[++i];
        } else if (strcmp(argv[i], "--check-config") == 0 && i + 1 < argc) {
            return check_config(argv[i + 1]);
        } else if (role == SPOKE_ROLE_EDGE && strcmp(argv[i], "--single-process") == 0) {
            single = 1;
        } else if (strcmp(argv[i], "--version") == 0) {
            printf("%s %s (plugin ABI %d.%d)\n", prog, SPOKE_VERSION, SPOKE_ABI_MAJOR,
                   SPOKE_ABI_MINOR);
            return 0;
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (cmd == NULL && (strcmp(argv[i], "status") == 0 || strcmp(argv[i], "reload") == 0)) {
            cmd = argv[i];
        } else if (cmd == NULL && role == SPOKE_ROLE_CONTROL && strcmp(argv[i], "kv") == 0 &&
                   i + 1 < argc) {
            cmd = argv[i];
            kv_args = &argv[i + 1];
            n_kv_args = 0;
            while (i + 1 < argc && strcmp(argv[i + 1], "-c") != 0 &&
                   strcmp(argv[i + 1], "--config") != 0) {
                i++;
                n_kv_args++;
            }
        } else {
            fprintf(stderr, "%s: unknown argument '%s'\n", prog, argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (config_path == NULL) {
        usage(stderr);
        return 2;
    }
    if (cmd != NULL && strcmp(cmd, "kv") == 0)
        return kv_main(config_path, kv_args, n_kv_args);
    if (cmd != NULL)
        return strcmp(cmd, "status") == 0 ? status_main(config_path) : reload_main(config_path);
    signal(SIGPIPE, SIG_IGN);
    if (single)
        return single_process(config_path);
    return spk_supervisor_main(config_path, "/proc/self/exe", role);
}
