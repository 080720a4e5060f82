"""The command line of `rlaif-ray` (cli.py) and one module per command: each parses its
arguments, resolves the machine's `auto` values, runs the preflight (every check that needs
files or models, before Ray starts) and calls the Ray layer (actors/) or the core.

May import: everything (the top layer).
"""
