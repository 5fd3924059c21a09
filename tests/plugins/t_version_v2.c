/* t_version_v2 -- "t-version" 2.0.0: see t_version_v1.c. */
#define T_VERSION "2.0.0"
#include "t_version_v1.c"
