"""Subcommands of the `fedcoe` CLI, one module each: with `fedcoe_edge/cli.py`, the app
shell on top of every layer (docs/design.md, "Layers"); nothing in the library imports them."""
