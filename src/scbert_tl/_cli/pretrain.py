"""``scbert pretrain``: masked expression modelling on ``.h5ad`` files, alone or under ``torchrun``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .._options import PretrainOptions
from ._common import DEFAULT_MODEL, MODEL_HELP, DeprecatedAlias, verbosity_options

_DEFAULT = PretrainOptions()


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``scbert pretrain``: the options of :func:`scbert_tl.tl.pretrain` (handler: :func:`run`)."""
    p = sub.add_parser(
        "pretrain",
        help="pretrain scBERT by masked expression modelling on .h5ad files",
        description=(
            "Pretrain scBERT by masked expression modelling on one or more .h5ad files (streamed in chunks; "
            "files without bins for the model are binned on the fly). Under torchrun every process trains on "
            "its own shard: torchrun --nproc_per_node 4 -m scbert_tl pretrain data/*.h5ad --out model"
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="H5AD", help=".h5ad files (one corpus)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--out", metavar="MODEL_DIR", help="model folder to write")
    out.add_argument("--output", dest="out", action=DeprecatedAlias, new="--out", help=argparse.SUPPRESS)
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model at --out")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=_DEFAULT.epochs, help="passes over the training cells")
    g.add_argument("--max-steps", type=int, help="optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, help="cells per micro-batch per process (default: sized to the device)")
    g.add_argument("--accumulate", type=int, default=_DEFAULT.accumulate, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 0.001 for a new model, 0.0001 continued)")
    g.add_argument(
        "--weight-decay", type=float, default=_DEFAULT.weight_decay, help="AdamW weight decay (weight matrices only)"
    )
    g.add_argument(
        "--warmup", type=float, default=_DEFAULT.warmup, help="warm-up steps, or a fraction (< 1) of the run"
    )
    g.add_argument(
        "--schedule", choices=["cosine", "linear", "constant"], default=_DEFAULT.schedule, help="decay after warm-up"
    )
    g.add_argument(
        "--redraw-every",
        type=int,
        default=_DEFAULT.redraw_every,
        help="steps between FAVOR+ projection redraws (0: fixed)",
    )
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument(
        "--validation-size",
        type=float,
        help="held-out cells: a fraction < 1 or a count; 0 for none (default: 5%%, at most 2,000)",
    )
    g.add_argument("--eval-every", type=int, help="steps between evaluations (default: once per epoch)")
    g.add_argument("--checkpoint-dir", help="folder of the run's checkpoint (default: no checkpoints)")
    g.add_argument("--checkpoint-every", type=int, default=_DEFAULT.checkpoint_every, help="steps between checkpoints")
    g.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir")
    g.add_argument("--stop-after", type=int, help="stop after this many steps (resume later; default: run to the end)")
    g = p.add_argument_group("data and compute")
    g.add_argument("--chunk-size", type=int, default=_DEFAULT.chunk_size, help="cells read at a time")
    g.add_argument("--shuffle-buffer", type=int, default=_DEFAULT.shuffle_buffer, help="chunks shuffled together")
    g.add_argument("--n-genes", type=int, default=2000, help="genes of a new compact model")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: CUDA when available, else CPU)")
    g.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="autocast precision (default: bfloat16 on CUDA, float32 on CPU)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=_DEFAULT.random_state,
        help="seed of a new model, the held-out cells, the data order, the masks",
    )
    verbosity_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``scbert pretrain`` from parsed arguments; returns the exit status.

    Errors are printed, not raised.
    """
    from .._paths import check_model_target
    from ..tl import pretrain

    output = Path(args.out).expanduser()
    try:
        check_model_target(output, overwrite=args.overwrite)  # before the work, not after it
        model = pretrain(
            list(args.inputs),
            model=args.model,
            n_genes=args.n_genes,
            device=args.device,
            precision=args.precision,
            **options(args).as_dict(),
        )
        if int(os.environ.get("RANK", "0") or 0) == 0:
            model.save(output, overwrite=args.overwrite)
            final = model.provenance["pretraining"][-1]["final"]
            if final:
                print(
                    f"held-out masked accuracy {final['val_accuracy']:.4f} (baseline {final['baseline_accuracy']:.4f}), "
                    f"loss {final['val_loss']:.4f} (baseline {final['baseline_loss']:.4f})"
                )
            print(f"saved {model!r} to {output}")
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as e:
        print(f"scbert pretrain: error: {e}", file=sys.stderr)
        return 1
    return 0


def options(args: argparse.Namespace) -> PretrainOptions:
    """The run's options from parsed arguments (counts given as floats become integers; 0 turns redraws off)."""
    vs = args.validation_size
    if vs is not None and vs >= 1:
        if vs != int(vs):
            raise ValueError(f"--validation-size {vs}: a count of cells must be a whole number.")
        vs = int(vs)
    return PretrainOptions.of(
        vars(args),
        warmup=int(args.warmup) if args.warmup >= 1 else args.warmup,
        redraw_every=args.redraw_every or None,
        validation_size=vs,
        random_state=args.seed,
    )
