"""The ``scbert`` shell command: one module per command (``add_parser`` and ``run``), shared options in ``_common``.

At import time this package and the parsers it builds use the standard library only: scbert_tl's
heavy parts (torch, anndata, scanpy) are imported inside each command's ``run``, so that
``scbert --help`` answers at once.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from . import annotate, benchmark, demo, embed, finetune, pretrain
from ._common import Parser, check_out_name, setup

if TYPE_CHECKING:
    import argparse

COMMANDS = {
    "demo": demo,
    "finetune": finetune,
    "annotate": annotate,
    "embed": embed,
    "benchmark": benchmark,
    "pretrain": pretrain,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``scbert`` argument parser with every command."""
    from .._version import __version__

    parser = Parser(
        prog="scbert",
        description="scBERT cell type annotation on AnnData (.h5ad) files.",
        epilog="Run 'scbert COMMAND --help' for a command's options. Start with 'scbert demo'.",
    )
    parser.add_argument("--version", action="version", version=f"scbert-tl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scbert`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    setup(args)
    try:
        check_out_name(args.command, args.out)
        return COMMANDS[args.command].run(args)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        if args.verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"scbert {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scbert: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
