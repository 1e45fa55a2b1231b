"""``scbert demo``: the main job end to end on data that ships with scanpy."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import add_command, compute_options

if TYPE_CHECKING:
    import argparse

logger = logging.getLogger(__name__)

#: The command's line in `scbert --help`, and the opening of its own help.
SUMMARY = "fine-tune a compact model on scanpy's pbmc68k_reduced and annotate held-out cells"
DESCRIPTION = (
    "Fine-tune a compact scBERT on 80% of scanpy's bundled pbmc68k_reduced, annotate the other 20%, compare with L1 "
    "logistic regression, and write an h5ad, a figure, the model and results.json."
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the command and its options."""
    p = add_command(sub, "demo", SUMMARY, DESCRIPTION)
    p.add_argument("--out", type=Path, default=Path("scbert_demo"), metavar="DIR", help="output folder")
    p.add_argument("--epochs", type=int, default=15, help="maximum fine-tuning epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the 80/20 split and of the training")
    compute_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from .._paths import check_writable

    check_writable(args.out)  # before the work, not after it
    run_demo(args.out, epochs=args.epochs, seed=args.seed)
    return 0


def run_demo(out: str | Path = "scbert_demo", *, epochs: int = 15, seed: int = 0) -> dict[str, Any]:
    """Fine-tune a compact scBERT on 80% of ``pbmc68k_reduced``, annotate the other 20%, compare with L1 logistic regression.

    Writes ``annotated.h5ad`` (the test cells with predictions and embedding), ``demo.png`` (t-SNE of
    the embedding coloured by prediction and truth, confusion matrix), ``model/`` and
    ``results.json`` to ``out``.

    Parameters
    ----------
    out
        Output folder (created; existing files of the demo are replaced).
    epochs
        Maximum fine-tuning epochs.
    seed
        Seed of the split and the training.

    Returns
    -------
    The figures that were printed.
    """
    import json

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import scanpy as sc

    from .. import tl
    from .._metrics import scores
    from ..tl._evaluation._methods import l1_logistic
    from ..tl._finetune import stratified_split

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = sc.datasets.pbmc68k_reduced()
    adata = data.raw.to_adata()  # .raw: log1p-normalised expression (.X is scaled and cannot be binned)
    adata.obs = data.obs.copy()
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    codes = np.unique(labels, return_inverse=True)[1]
    train, test = stratified_split(codes, 0.2, np.random.default_rng(seed))
    ref, query = adata[train].copy(), adata[test].copy()
    print(
        f"pbmc68k_reduced: {adata.n_obs} cells, {adata.n_vars} genes; training on {ref.n_obs}, testing on {query.n_obs}"
    )

    model = tl.finetune(ref, "bulk_labels", model="compact", epochs=epochs, rng=seed)
    tl.annotate(query, model)
    tl.embed(query, model, representation="classifier")
    forced = np.asarray(model.classes)[query.obsm["scbert_probabilities"].argmax(1)]
    truth = query.obs["bulk_labels"].astype(str).to_numpy()
    ours = scores(truth, forced, model.classes)
    baseline_pred = l1_logistic(ref.X, ref.obs["bulk_labels"].astype(str), query.X, seed=seed)
    baseline = scores(truth, baseline_pred, model.classes)
    unknown = float((query.obs["scbert"] == "unknown").mean())

    # t-SNE rather than UMAP: 142 cells take it under a second, where UMAP's numba kernels compile for 8-12 s every run
    sc.tl.tsne(query, use_rep="X_scbert", random_state=seed)
    palette = dict(zip(data.obs["bulk_labels"].cat.categories, data.uns["bulk_labels_colors"], strict=True))
    palette["unknown"] = "#bbbbbb"
    _figure(query, palette, out / "demo.png")
    query.write_h5ad(out / "annotated.h5ad")
    model.save(out / "model", overwrite=True)

    result = {
        "train_cells": int(ref.n_obs),
        "test_cells": int(query.n_obs),
        "scbert": {k: ours[k] for k in ("accuracy", "macro_f1")},
        "l1_logistic_regression": {k: baseline[k] for k in ("accuracy", "macro_f1")},
        "unknown_fraction": unknown,
        "selected_epoch": model.provenance["selected_epoch"],
        "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'test cells (20%)':<28}{'accuracy':>10}{'macro F1':>10}")
    print(f"{'scBERT (compact)':<28}{ours['accuracy']:>10.3f}{ours['macro_f1']:>10.3f}")
    print(f"{'L1 logistic regression':<28}{baseline['accuracy']:>10.3f}{baseline['macro_f1']:>10.3f}")
    print(
        f"\n{100 * unknown:.1f}% of test cells called 'unknown' (energy above the threshold for 5% false unknowns on the "
        "validation cells; scored above by their top class)"
    )
    print(f"Wrote {out / 'annotated.h5ad'}, {out / 'demo.png'}, {out / 'model'} in {result['seconds']:.0f} s")
    return result


def _figure(query: Any, palette: dict[str, str], path: Path) -> None:
    """t-SNE of the embedding coloured by true type and by prediction (one legend), and the confusion matrix.

    The two rows are subfigures with layouts of their own, so that the matrix's long row labels do not
    squeeze the maps, and the colour bar sits beside the matrix rather than under the legend.
    """
    import matplotlib.pyplot as plt
    import scanpy as sc

    from .. import pl

    fig = plt.figure(figsize=(11, 11), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.25])
    maps = top.subplots(1, 2)
    kwargs = {"show": False, "palette": palette, "size": 40, "frameon": False}
    sc.pl.tsne(query, color="bulk_labels", ax=maps[0], title="true type", legend_loc="none", **kwargs)
    sc.pl.tsne(query, color="scbert", ax=maps[1], title="scBERT prediction", **kwargs)
    matrix = bottom.subplots()
    pl.confusion(query, truth="bulk_labels", prediction="scbert", ax=matrix, show=False)
    matrix.set_title("test cells: true against predicted type")
    fig.savefig(path, dpi=100)
    plt.close(fig)
