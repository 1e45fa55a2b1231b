"""What the streamed commands (``scbert annotate``, ``scbert embed``) share: their options and the checks before the work."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._common import add_command, check_input, check_output_file, data_options, stream_kwargs, stream_options

if TYPE_CHECKING:
    import argparse


def streamed_parser(
    sub: argparse._SubParsersAction,
    name: str,
    summary: str,
    description: str,
    *,
    cells: str,
    model: str,
    out: str,
    key_added: tuple[str, str],
) -> argparse.ArgumentParser:
    """The parser of a streamed command ``name`` (as :func:`~._common.add_command`) with ``--model``, ``--out`` and ``--key-added`` (default, help)."""
    p = add_command(sub, name, summary, description, cells=cells)
    p.add_argument("--model", required=True, help=model)
    p.add_argument("--out", required=True, type=Path, metavar="OUT.h5ad", help=out)
    p.add_argument("--key-added", default=key_added[0], help=key_added[1])
    return p


def streamed_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the chunk, input and compute options of a streamed command; returns ``parser``."""
    stream_options(parser)
    data_options(parser)
    return parser


def run_streamed(args: argparse.Namespace, tool: Literal["annotate_file", "embed_file"], **options: Any) -> Any:
    """Check the input and output files (before any work), load ``--model`` and run ``tool`` of :mod:`scbert_tl.tl._files` on them.

    ``options`` are the command's own; ``key_added`` and the chunk, input and compute options come from ``args``.
    """
    from .._scbert import ScBERT
    from ..tl import _files

    check_output_file(args.out, overwrite=args.overwrite)
    check_input(args.input)
    model = ScBERT.load(args.model)
    return getattr(_files, tool)(
        args.input, args.out, model, key_added=args.key_added, **options, **stream_kwargs(args)
    )
