"""The `kvcomm` command: argparse only. Each verb group builds a config and calls the library."""
