"""``scbert benchmark``: run evaluation protocols and write a report folder (tables, figures, results).

Standard library only at import time (numpy and the rest inside the functions that use them).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import data_options, read_h5ad, training_options
from ._report import json_default, machine, markdown, mean_sd, save_figure, versions

if TYPE_CHECKING:
    import argparse

    import pandas as pd
    from anndata import AnnData

logger = logging.getLogger(__name__)

PROTOCOLS = {
    "cv": "cross-validation",
    "size": "reference-size curve",
    "novel": "novel-type detection",
    "imbalance": "class imbalance",
    "transfer": "transfer between datasets",
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the command and its options."""
    bench = sub.add_parser(
        "benchmark",
        help="evaluate scBERT beside baselines on labelled .h5ad files and write a report",
        description="Run evaluation protocols (scBERT fine-tuning beside L1 logistic regression and, when installed, "
        "CellTypist, on the same folds) and write REPORT_DIR/report.md with tables, PNG figures, CSV tables and "
        "results.json. Protocols: cv (stratified cross-validation), size (reference-size curve), novel "
        "(leave-one-type-out novel-type detection), imbalance (large and rare types alternating), transfer "
        "(train on one file, annotate another; needs two or more files). All but transfer run on each file.",
    )
    bench.add_argument("inputs", type=Path, nargs="+", metavar="IN.h5ad", help="labelled cells, one file a dataset")
    bench.add_argument("--label-key", required=True, help="obs column with the cell types (in every file)")
    bench.add_argument("--out", required=True, type=Path, metavar="REPORT_DIR", help="report folder")
    bench.add_argument("--protocols", default="cv", help=f"comma-separated, from {','.join(PROTOCOLS)}")
    bench.add_argument(
        "--model",
        default="compact",
        help="where fine-tuning starts: 'compact' (a new CPU-sized model; runs offline on a laptop CPU), "
        "'scbert-panglao' (the published weights: a download, a GPU advisable) or a saved model's folder",
    )
    bench.add_argument(
        "--baselines",
        default="l1_logistic,celltypist",
        help="comma-separated, from l1_logistic,celltypist ('none' for none; celltypist is skipped when not installed)",
    )
    bench.add_argument("--n-splits", type=int, default=5, help="folds of the stratified split")
    bench.add_argument(
        "--folds", help="comma-separated folds to run (default: all for cv, the first for size, novel and imbalance)"
    )
    _protocol_options(bench)
    bench.add_argument(
        "--patience",
        type=int,
        help="epochs without validation improvement (default: 3 for a new model, 5 from trained weights)",
    )
    bench.add_argument(
        "--gene-bias",
        type=float,
        default=0.0,
        metavar="SD",
        help="per-gene capture factors in depth augmentation, as scbert finetune --gene-bias (default: 0, off)",
    )
    bench.add_argument(
        "--mask-genes",
        type=float,
        metavar="SHARE",
        help="gene masking, as scbert finetune --mask-genes (default: 1 for a new model, 0 from trained weights, "
        "and 0 in the transfer protocol, whose model takes its genes among the query's)",
    )
    training_options(bench)
    bench.add_argument("--validation", type=float, default=0.1, help="share of training cells for model selection")
    bench.add_argument("--seed", type=int, default=0, help="seed of the folds and of the training")
    bench.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty REPORT_DIR")
    data_options(bench)
    return bench


def _protocol_options(bench: argparse.ArgumentParser) -> None:
    """The options of single protocols (size, novel, imbalance, transfer)."""
    bench.add_argument("--fractions", default="0.1,0.3,0.6,0.9", help="size: shares of the training folds")
    bench.add_argument(
        "--leave-out",
        action="append",
        metavar="TYPE",
        help="novel: a type to leave out (repeatable; default: every type)",
    )
    bench.add_argument(
        "--thresholds", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="novel: 'unknown' thresholds to sweep"
    )
    bench.add_argument(
        "--false-unknown-rate",
        type=float,
        default=0.05,
        help="novel: share of validation cells the chosen thresholds call 'unknown'",
    )
    bench.add_argument(
        "--types",
        action="append",
        metavar="TYPE",
        help="imbalance: types in design order large, small, ... (repeatable; default: the four most abundant)",
    )
    bench.add_argument("--ratio", type=float, default=100, help="imbalance: large-to-small ratio")
    bench.add_argument(
        "--reference",
        action="append",
        metavar="NAME",
        help="transfer: train on this input (its file name without .h5ad; repeatable) and annotate the others "
        "(default: leave one input out in turn)",
    )
    bench.add_argument(
        "--label-map",
        metavar="JSON|COLUMN",
        help="transfer: score at a shared label level: a JSON file mapping labels to shared labels (null: leave "
        "those cells out), or an obs column holding every cell's shared label",
    )


def _list(text: str, cast: Any = str, what: str = "value") -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise ValueError(f"{what} must be a comma-separated list of numbers, got {text!r}.") from None


def _label_map(text: str | None) -> dict[str, str | None] | str | None:
    """``--label-map``: a JSON file of label -> shared label, else the name of an obs column."""
    if text is None or not text.lower().endswith(".json"):
        return text
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"--label-map {text}: no such file.")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--label-map {text} is not valid JSON ({e}).") from e
    if not isinstance(mapping, dict):
        raise ValueError(f"--label-map {text} must hold a JSON object of label -> shared label (or null).")
    return mapping


def _load(path: Path, label_key: str) -> AnnData:
    adata = read_h5ad(path)
    if label_key not in adata.obs:
        raise KeyError(f"--label-key {label_key!r} is not a column of obs in {path}; columns are {list(adata.obs)}.")
    return adata


class _Report:
    """The report being written: its folder, markdown lines, results.json content, and the protocols' shared arguments."""

    def __init__(self, args: argparse.Namespace, finetune_kwargs: dict[str, Any], baselines: list[str]) -> None:
        self.args, self.out = args, args.out
        folds = None if args.folds is None else _list(args.folds, int, "--folds")
        self.folds = folds
        self.common = {
            "model": args.model,
            "baselines": baselines,
            "validation": args.validation,
            "finetune_kwargs": finetune_kwargs,
            "rng": args.seed,
        }
        self.split = {"n_splits": args.n_splits}
        self.one_fold = {"folds": (0,) if folds is None else folds}
        shown = json.dumps({k: v for k, v in finetune_kwargs.items() if v is not None})
        self.lines = [
            "# scBERT benchmark",
            "",
            f"Command: `scbert {' '.join(args.argv)}`",
            "",
            f"Machine: {machine()}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in versions().items())
            + f". Model: {args.model}; fine-tuning: {shown}, validation share {args.validation}, seed {args.seed}.",
        ]
        self.results: dict[str, Any] = {
            "command": ["scbert", *args.argv],
            "machine": machine(),
            "versions": versions(),
            "results": {},
        }

    def record(self, name: str, adata: AnnData, key: str, seconds: float) -> pd.DataFrame:
        """Keep a protocol's results: its CSV, its rows and parameters in results.json."""
        import numpy as np

        frame = adata.uns[key]["results"]
        frame.to_csv(self.out / f"{name}.csv", index=False)
        params = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in adata.uns[key]["params"].items()}
        self.results["results"][name] = {"params": params, "seconds": seconds, "rows": frame.to_dict(orient="records")}
        logger.info("benchmark: %s done in %.0f s", name, seconds)
        return frame

    def write(self) -> Path:
        self.lines += [
            "",
            "Figures: the PNG files beside this report; every table is also a CSV file, and results.json holds "
            "all rows with the parameters of each protocol.",
        ]
        (self.out / "report.md").write_text("\n".join(self.lines) + "\n")
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=json_default) + "\n")
        return self.out / "report.md"


def _cv(r: _Report, name: str, adata: AnnData) -> None:
    from .. import pl, tl

    t0 = time.perf_counter()
    tl.cross_validate(adata, r.args.label_key, folds=r.folds, key_added="bench_cv", **r.split, **r.common)
    frame = r.record(name, adata, "bench_cv", time.perf_counter() - t0)
    r.lines += [
        markdown(mean_sd(frame, ["method"], ["accuracy", "macro_f1", "ece"])),
        "",
        "Per fold (ece: expected calibration error of the test cells):",
        "",
        markdown(frame[["method", "fold", "n_train", "n_test", "accuracy", "macro_f1", "ece", "seconds"]], 3),
        "",
        "Calibration over all test cells of these folds (each predicted by the model of its fold; ece_noise: what "
        "a perfectly calibrated method with the same confidences would show on as many cells):",
        "",
        markdown(adata.uns["bench_cv"]["calibration"], 3),
    ]
    save_figure(pl.cross_validation(adata, key="bench_cv", show=False), r.out / f"{name}.png")


def _size(r: _Report, name: str, adata: AnnData) -> None:
    from .. import pl, tl

    t0 = time.perf_counter()
    fractions = _list(r.args.fractions, float, "--fractions")
    tl.reference_size_curve(
        adata, r.args.label_key, fractions=fractions, key_added="bench_size", **r.split, **r.one_fold, **r.common
    )
    frame = r.record(name, adata, "bench_size", time.perf_counter() - t0)
    table = frame.groupby(["method", "fraction"], sort=False)[["n_train", "accuracy", "macro_f1"]].mean()
    r.lines += [markdown(table.reset_index())]
    save_figure(pl.reference_size_curve(adata, key="bench_size", show=False), r.out / f"{name}.png")


def _novel(r: _Report, name: str, adata: AnnData) -> None:
    from .. import pl, tl

    t0, args = time.perf_counter(), r.args
    tl.novel_type_detection(
        adata,
        args.label_key,
        leave_out=args.leave_out,
        thresholds=_list(args.thresholds, float, "--thresholds"),
        false_unknown_rate=args.false_unknown_rate,
        key_added="bench_novel",
        **r.split,
        **r.one_fold,
        **r.common,
    )
    frame = r.record(name, adata, "bench_novel", time.perf_counter() - t0)
    cols = ["novel_recall", "known_accuracy", "known_unknown"]
    table = frame.groupby(["method", "left_out", "threshold"], sort=False)[cols].mean().reset_index()
    chosen = adata.uns["bench_novel"]["chosen"]
    chosen.to_csv(r.out / f"{name}_chosen.csv", index=False)
    by = ["method", "score", "left_out"]
    chosen_table = chosen.groupby(by, sort=False)[["threshold", "validation_unknown", *cols, "auroc", "ece"]].mean()
    r.lines += [
        "novel_recall: share of the left-out type called 'unknown'; known_accuracy: share of known "
        "test cells given their true type ('unknown' counts as wrong).",
        "",
        f"At the threshold chosen on the validation cells (without the left-out type) for "
        f"{args.false_unknown_rate:.0%} false unknowns there, per novelty score (auroc: novel against "
        "known test cells; ece: expected calibration error on the known test cells):",
        "",
        markdown(chosen_table.reset_index()),
        "",
        "Sweep of the probability threshold:",
        "",
        markdown(table),
    ]
    novel_as = adata.uns["bench_novel"]["novel_as"]
    novel_as.to_csv(r.out / f"{name}_predicted_as.csv", index=False)
    for method in frame["method"].unique():
        ax = pl.novel_type_detection(adata, key="bench_novel", methods=[method], show=False)
        ax.set_title(f"{method}; large dots: threshold 0.5", fontsize="small")
        save_figure(ax, r.out / f"{name}_{method}.png")


def _imbalance(r: _Report, name: str, adata: AnnData) -> None:
    from .. import pl, tl

    t0 = time.perf_counter()
    tl.class_imbalance(
        adata,
        r.args.label_key,
        types=r.args.types,
        ratio=r.args.ratio,
        key_added="bench_imbalance",
        **r.split,
        **r.one_fold,
        **r.common,
    )
    frame = r.record(name, adata, "bench_imbalance", time.perf_counter() - t0)
    info = adata.uns["bench_imbalance"]
    f1 = [c for c in frame.columns if c.startswith("f1:")]
    design = ", ".join(f"{t} {n}" + (" (rare)" if t in info["rare"] else "") for t, n in info["design"].items())
    r.lines += [
        f"Training cells per type: {design}.",
        "",
        markdown(mean_sd(frame, ["method"], ["accuracy", "macro_f1", "ece", *f1])),
    ]
    metrics = ["macro_f1", *(f"f1:{t}" for t in info["rare"])]
    save_figure(pl.cross_validation(adata, key="bench_imbalance", metrics=metrics, show=False), r.out / f"{name}.png")


def _transfer(r: _Report, datasets: dict[str, AnnData]) -> None:
    from .. import pl, tl

    r.lines += ["", f"## {PROTOCOLS['transfer']}", ""]
    t0 = time.perf_counter()
    tl.dataset_transfer(
        datasets,
        r.args.label_key,
        reference=r.args.reference,
        label_map=_label_map(r.args.label_map),
        key_added="bench_transfer",
        **r.common,
    )
    first = next(iter(datasets.values()))
    frame = r.record("transfer", first, "bench_transfer", time.perf_counter() - t0)
    columns = ["method", "reference", "held_out", "n_train", "n_test", "n_unseen", "n_unmatched"]
    training = first.uns["bench_transfer"]["training"]
    r.lines += [
        "n_unseen: query cells of types the training lacks; n_unmatched: query cells predicted as a training "
        "type the query lacks (both count as errors).",
        "",
        markdown(frame[[*columns, "accuracy", "macro_f1", "ece"]]),
        "",
        *(
            f"- {query}: trained on {', '.join(info['datasets'])} ({info['labels']} labels), baselines on "
            f"{info['n_genes']} shared genes; training types the query lacks: "
            f"{', '.join(info['unmatched']) or 'none'}"
            for query, info in training.items()
        ),
    ]
    save_figure(pl.cross_validation(first, key="bench_transfer", show=False), r.out / "transfer.png")


_PER_DATASET = {"cv": _cv, "size": _size, "novel": _novel, "imbalance": _imbalance}


def run(args: argparse.Namespace) -> int:
    """Run the protocols of ``scbert benchmark`` and write the report; returns the exit status."""
    import matplotlib

    matplotlib.use("Agg")
    protocols = _list(args.protocols)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"Unknown protocols {unknown or protocols}; choose from {','.join(PROTOCOLS)}.")
    if "transfer" in protocols and len(args.inputs) < 2:
        raise ValueError("The transfer protocol needs two or more input files (train on all but one, test on it).")
    _label_map(args.label_map)  # checked before any work
    baselines = [] if args.baselines.strip().lower() == "none" else _list(args.baselines)
    for option in ("folds", "fractions", "thresholds"):
        if getattr(args, option) is not None:
            _list(getattr(args, option), float if option != "folds" else int, f"--{option}")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to write into it.")
    stems = [p.stem for p in args.inputs]
    if len(set(stems)) != len(stems):
        raise ValueError(f"The input files need different names (their stems name the report's sections): {stems}.")
    datasets = {stem: _load(p, args.label_key) for stem, p in zip(stems, args.inputs, strict=True)}
    out.mkdir(parents=True, exist_ok=True)
    finetune_kwargs = {
        "epochs": args.epochs,
        "patience": args.patience,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "class_weight": args.class_weight,
        "select_on": args.select_on,
    }
    if args.gene_bias:
        finetune_kwargs["gene_bias"] = args.gene_bias
    if args.mask_genes is not None:
        finetune_kwargs["mask_genes"] = args.mask_genes
    for key in ("gene_key", "layer", "use_raw"):
        if getattr(args, key, None) is not None:
            finetune_kwargs[key] = getattr(args, key)
    r = _Report(args, finetune_kwargs, baselines)
    per_dataset = [p for p in protocols if p != "transfer"]
    for stem, adata in datasets.items() if per_dataset else ():
        r.lines += ["", f"## {stem} ({adata.n_obs} cells, {adata.obs[args.label_key].nunique()} types)"]
        for protocol in per_dataset:
            r.lines += ["", f"### {PROTOCOLS[protocol]}", ""]
            _PER_DATASET[protocol](r, f"{stem}_{protocol}", adata)
    if "transfer" in protocols:
        _transfer(r, datasets)
    print(f"Wrote the report to {r.write()}", file=sys.stdout)
    return 0
