/*
 * cli.h -- the command line shared by spoked and hubd (cli.c): parse argv, then validate
 * a config, serve (supervisor or worker), or talk to a running instance.
 */
#ifndef SPK_CLI_H
#define SPK_CLI_H

#include "spoke.h"

/* main() of spoked (SPOKE_ROLE_EDGE) or hubd (SPOKE_ROLE_CONTROL); returns the exit code. */
int spk_cli_main(int argc, char **argv, spoke_role role);

#endif
