/*
 * t_spin -- test plugin "t-spin": its timer (every 200 ms) spins forever on the third tick,
 * so the worker's loop stops turning: the supervisor must notice the lost heartbeat.
 */
#include "spoke.h"

static const spoke_host *host;
static int ticks;

static void tick(void *self, void *arg)
{
    (void)self;
    (void)arg;
    if (++ticks >= 3)
        for (volatile unsigned long i = 0;; i++)
            ;
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    (void)self;
    return host->every(ctx, 200, tick, NULL) > 0 ? 0 : SPOKE_ERR_INVALID;
}

static const spoke_plugin t_spin = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-spin",
    .version = "1.0.0",
    .init = init,
};

SPOKE_PLUGIN_ENTRY(t_spin, host)
