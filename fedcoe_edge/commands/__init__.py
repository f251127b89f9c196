"""Subcommands of the `fedcoe` CLI, one module each."""
