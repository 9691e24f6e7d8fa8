"""``unireg``: the command line front end (argparse); each sub-command lives in its own module."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
