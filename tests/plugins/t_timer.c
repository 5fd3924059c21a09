/*
 * t_timer -- test plugin "t-timer": init starts a 100 ms timer with host->every() that
 * logs "t-timer tick N" (N = 1, 2, ...); on_tick logs "t-timer on_tick" once per call.
 */
#include "spoke.h"

static const spoke_host *host;

typedef struct timer_state {
    spoke_ctx *ctx;
    unsigned long ticks;
} timer_state;

static timer_state state;

static void tick(void *self, void *arg)
{
    (void)arg;
    timer_state *t = self;
    t->ticks++;
    host->log(t->ctx, SPOKE_LOG_INFO, "t-timer tick %lu", t->ticks);
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    state.ctx = ctx;
    state.ticks = 0;
    *self = &state;
    int64_t id = host->every(ctx, 100, tick, NULL);
    return id > 0 ? 0 : (int)id;
}

static void on_tick(void *self)
{
    const timer_state *t = self;
    host->log(t->ctx, SPOKE_LOG_INFO, "t-timer on_tick");
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER, .name = "t-timer",
    .version = "1.0.0",  .description = "a 100 ms timer and on_tick, both logged",
    .init = init,        .on_tick = on_tick,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
