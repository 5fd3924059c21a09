/*
 * spoked -- the edge: proxies client traffic to an upstream through the plugin chain, and
 * sends what plugins queue with send_to_control() to hubd (cli.c has the command line).
 */
#include "cli.h"

int main(int argc, char **argv)
{
    return spk_cli_main(argc, argv, SPOKE_ROLE_EDGE);
}
