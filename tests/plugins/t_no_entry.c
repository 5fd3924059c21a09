/*
 * t_no_entry -- test plugin: a shared object without the spoke_plugin_v1 symbol (it
 * exports another function instead). The host must refuse it: "no spoke_plugin_v1 symbol".
 */
#include "spoke.h"

SPOKE_EXPORT int t_no_entry_something_else(void);
SPOKE_EXPORT int t_no_entry_something_else(void)
{
    return 42;
}
