"""Every command-line entry point (the `lingosteer` program's subcommands and `make demo`).

The top layer: entry points import components; nothing below ever imports an entry point."""
