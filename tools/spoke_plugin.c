/*
 * spoke-plugin -- look at a plugin .so the way the host will.
 *
 *   spoke-plugin inspect X.so            ABI version, name, version, hooks, dependencies, SHA-256
 *   spoke-plugin verify X.so [--sha256 HEX] [--init]
 *                                        exit 0 if a host would load it; otherwise print the
 *                                        reason it would be refused and exit 1. --init also
 *                                        runs the plugin's init (with no config) and fini.
 *
 * Both go through the host's own loader (spk_plugin_open), so the checks cannot drift from
 * what spoked does. Note that loading a plugin runs its constructors: only inspect files
 * you would also be willing to load.
 */
#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include <ev.h>

#include "host.h"
#include "loader.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: spoke-plugin inspect PLUGIN.so\n"
               "       spoke-plugin verify PLUGIN.so [--sha256 HEX] [--init]\n");
}

static void print_hooks(const spoke_plugin *t)
{
    static const struct {
        size_t off;
        const char *name;
    } hooks[] = {
#define H(f) {offsetof(spoke_plugin, f), #f}
        H(init), H(fini), H(health), H(on_config_loaded), H(on_open), H(on_close),
        H(on_traffic_from_client), H(on_traffic_to_server), H(on_traffic_from_server),
        H(on_traffic_to_client), H(on_tick), H(accept_edge_payload), H(on_half_close),
#undef H
    };
    printf("hooks:");
    int n = 0;
    for (size_t i = 0; i < sizeof(hooks) / sizeof(hooks[0]); i++) {
        void *fn;
        memcpy(&fn, (const char *)t + hooks[i].off, sizeof(fn));
        if (fn != NULL) {
            printf(" %s", hooks[i].name);
            n++;
        }
    }
    printf("%s\n", n ? "" : " (none)");
}

static int inspect(const char *path)
{
    spk_errbuf eb;
    spk_plugin *p;
    if (spk_plugin_open(path, NULL, spk_host_table(), &p, &eb) != 0) {
        fprintf(stderr, "spoke-plugin: %s\n", eb.msg);
        return 1;
    }
    char hex[65];
    spk_sha256_hex(p->sha256, hex);
    printf("file:        %s\n", path);
    printf("abi:         %u.%u (struct_size %u; host %d.%d, %zu)\n", p->table.abi_major,
           p->table.abi_minor, p->plugin_struct_size, SPOKE_ABI_MAJOR, SPOKE_ABI_MINOR,
           sizeof(spoke_plugin));
    printf("name:        %s\n", p->table.name);
    printf("version:     %s\n", p->table.version);
    printf("description: %s\n", p->table.description ? p->table.description : "");
    print_hooks(&p->table);
    printf("dependencies:");
    int n = 0;
    for (const char *const *r = p->table.dependencies; r != NULL && *r != NULL; r++, n++)
        printf(" %s", *r);
    printf("%s\n", n ? "" : " (nothing)");
    printf("sha256:      %s\n", hex);
    spk_plugin_close(p);
    return 0;
}

static int parse_hex(const char *hex, uint8_t out[32])
{
    if (strlen(hex) != 64)
        return -1;
    for (int i = 0; i < 32; i++) {
        unsigned v;
        if (!isxdigit((unsigned char)hex[2 * i]) || !isxdigit((unsigned char)hex[2 * i + 1]) ||
            sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (uint8_t)v;
    }
    return 0;
}

static int verify(const char *path, const char *sha_hex, int run_init)
{
    uint8_t want[32];
    if (sha_hex != NULL && parse_hex(sha_hex, want) != 0) {
        fprintf(stderr, "spoke-plugin: --sha256 wants 64 hex digits\n");
        return 2;
    }
    spk_errbuf eb;
    spk_plugin *p;
    if (spk_plugin_open(path, sha_hex ? want : NULL, spk_host_table(), &p, &eb) != 0) {
        fprintf(stderr, "spoke-plugin: %s\n", eb.msg);
        return 1;
    }
    int rc = 0;
    if (run_init) {
        spk_host_env env;
        struct ev_loop *loop = ev_default_loop(0);
        spk_host_env_init(&env, loop, NULL, SPOKE_ROLE_EDGE);
        p->env = &env;
        spk_plugin_set set = {.v = &p, .n = 1};
        if (spk_plugin_set_init(&set, SPOKE_ROLE_EDGE, &eb) != 0) {
            fprintf(stderr, "spoke-plugin: %s\n", eb.msg);
            rc = 1;
        }
        spk_host_plugin_unload(p);
    } else {
        spk_plugin_close(p);
    }
    if (rc == 0)
        printf("%s: OK: a host with ABI %d.%d would load it\n", path, SPOKE_ABI_MAJOR,
               SPOKE_ABI_MINOR);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "inspect") == 0 && argc == 3)
        return inspect(argv[2]);
    if (strcmp(argv[1], "verify") == 0) {
        const char *sha = NULL;
        int run_init = 0;
        for (int i = 3; i < argc; i++) {
            if (strcmp(argv[i], "--sha256") == 0 && i + 1 < argc)
                sha = argv[++i];
            else if (strcmp(argv[i], "--init") == 0)
                run_init = 1;
            else {
                usage(stderr);
                return 2;
            }
        }
        return verify(argv[2], sha, run_init);
    }
    usage(stderr);
    return 2;
}
