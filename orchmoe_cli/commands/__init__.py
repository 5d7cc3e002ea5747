"""One thin module per command: set up, call the core and the analysis, write artifacts.

The CLI (``orchmoe_cli.cli``) parses options and renders results; everything between is here. Modules
are imported by the CLI only when their command runs, so ``--help`` and recipe errors never wait for torch.
"""
