"""Novel cell type detection: leave one type out of training and see whether it is called "unknown".

    python benchmarks/novel_type.py --leave-out B --epochs 6 --out novel_B.json

Trains the compact model on 80% of the PBMC3k cells of every other type (stratified; 10% of that is
the validation split), then annotates the other 20% of those types and every cell of the left-out
type. Reports, per confidence threshold, the fraction of the left-out type called "unknown" and the
accuracy on the held-out cells of known types (an "unknown" call counts as an error there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PBMC3K = HERE.parent.parent / "shared" / "data" / "pbmc3k_counts.h5ad"
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leave-out", default="B", help="cell type kept out of training")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import anndata as ad

    import scbert_tl as scbert
    from scbert_tl.tl._finetune import stratified_split

    scbert.settings.verbosity = 1
    adata = ad.read_h5ad(PBMC3K)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    novel = labels == args.leave_out
    if not novel.any():
        raise SystemExit(f"no cells of type {args.leave_out!r}; types are {sorted(set(labels))}")
    known = np.flatnonzero(~novel)
    codes = np.unique(labels[known], return_inverse=True)[1]
    train, test = stratified_split(codes, 0.2, np.random.default_rng(args.seed))
    train, test = known[train], known[test]
    t0 = time.perf_counter()
    model = scbert.tl.finetune(adata[train].copy(), "cell_type", model="compact", epochs=args.epochs, rng=args.seed)
    query = adata[np.concatenate([test, np.flatnonzero(novel)])].copy()
    scbert.tl.annotate(query, model, unknown_threshold=0.0)
    probs = query.obsm["scbert_probabilities"]
    top = np.asarray(model.classes)[probs.argmax(1)]
    confidence = probs.max(1)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    is_novel = truth == args.leave_out
    sweep = []
    for t in THRESHOLDS:
        called = np.where(confidence < t, "unknown", top)
        sweep.append(
            {
                "threshold": t,
                "novel_called_unknown": float((called[is_novel] == "unknown").mean()),
                "known_accuracy": float((called[~is_novel] == truth[~is_novel]).mean()),
                "known_called_unknown": float((called[~is_novel] == "unknown").mean()),
            }
        )
    novel_as = dict(zip(*np.unique(top[is_novel], return_counts=True), strict=True))
    result = {
        "left_out": args.leave_out,
        "n_novel": int(is_novel.sum()),
        "n_known_test": int((~is_novel).sum()),
        "n_train": int(train.size),
        "known_accuracy_forced": float((top[~is_novel] == truth[~is_novel]).mean()),
        "novel_top_class": {k: int(v) for k, v in novel_as.items()},
        "sweep": sweep,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
