/*
 * hubd -- the control plane: receives batches of plugin payloads from many edges over gRPC
 * and hands each one, once, to the control plugin with the same plugin ID (hub.h; cli.c
 * has the command line).
 */
#include "cli.h"

int main(int argc, char **argv)
{
    return spk_cli_main(argc, argv, SPOKE_ROLE_CONTROL);
}
