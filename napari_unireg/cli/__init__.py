"""``unireg``: the command line front end (argparse); each sub-command lives in its own module."""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
