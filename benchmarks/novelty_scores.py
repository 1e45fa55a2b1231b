"""Which novelty score separates a left-out cell type best? scBERT's scores beside distances in its embedding.

Fine-tunes the compact model exactly as ``scbert.tl.novel_type_detection`` does (fold ``--fold`` of
the 5-fold split, the left-out type removed from training, the same validation cells, seed 0), then
scores the test fold's known cells and every cell of the left-out type with:

- ``probability``: one minus the highest class probability;
- ``calibrated_probability``: the same after temperature scaling (fitted on the validation cells);
- ``energy``: minus the log-sum-exp of the logits (what ``annotate`` uses);
- ``mahalanobis``: squared Mahalanobis distance of the classifier's last hidden layer to the nearest
  class mean (class means and a shared covariance, 10% shrunk to its diagonal, from the training cells);
- ``knn``: mean cosine distance of that layer to the 10 nearest training cells.

For each: AUROC (novel against known test cells), and novel recall, known-type accuracy (an
"unknown" call counts as wrong) and the share of known cells called unknown at the threshold that
calls ``--rate`` of the validation cells unknown.

    python benchmarks/novelty_scores.py ../shared/data/pbmc3k_counts.h5ad --leave-out B
    python benchmarks/novelty_scores.py ../shared/data/baron_pancreas_2000genes.h5ad --leave-out gamma
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="labelled .h5ad (raw counts or log-normalised)")
    parser.add_argument("--label-key", default="cell_type")
    parser.add_argument("--leave-out", required=True)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rate", type=float, default=0.05, help="false-unknown rate on the validation cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the table and the settings as JSON")
    args = parser.parse_args()

    import anndata as ad
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    import scbert_tl as scbert
    from scbert_tl.tl._data import tokens_for
    from scbert_tl.tl._evaluation._folds import fold_splits
    from scbert_tl.tl._finetune import stratified_split
    from scbert_tl.train import _calibration as cal
    from scbert_tl.train import run_batches

    t0 = time.perf_counter()
    adata = ad.read_h5ad(args.data)
    labels = adata.obs[args.label_key].astype(str).to_numpy()
    train, test = fold_splits(labels, 5, args.seed)[args.fold]
    is_novel = labels == args.leave_out
    train = train[~is_novel[train]]
    _, val = stratified_split(labels[train], 0.1, np.random.default_rng([args.seed, args.fold]))  # as the protocol
    test = np.union1d(test[~is_novel[test]], np.flatnonzero(is_novel))
    ref = adata[train].copy()
    model = scbert.tl.finetune(
        ref,
        args.label_key,
        model="compact",
        validation=list(ref.obs_names[val]),
        epochs=args.epochs,
        patience=args.patience,
        lr=args.lr,
        rng=args.seed,
    )

    def logits_and_hidden(network, x):
        head = network.classifier
        h = head.act(head.reduce(network.encode(x)).squeeze(-1))
        hidden = head.act(head.fc2(head.act(head.fc1(h))))
        return head.fc3(hidden).float(), hidden.float()

    ref_logits, ref_hidden = run_batches(model.network, tokens_for(ref, model), logits_and_hidden)
    query = adata[test].copy()
    logits, hidden = run_batches(model.network, tokens_for(query, model), logits_and_hidden)
    classes = list(model.classes)
    ref_y = np.searchsorted(classes, labels[train])
    fit = np.setdiff1d(np.arange(train.size), val)
    novel = is_novel[test]
    right = np.asarray(classes)[logits.argmax(1)] == labels[test]

    def mahalanobis_fn():
        feats = ref_hidden[fit].astype(np.float64)
        means = np.stack([feats[ref_y[fit] == c].mean(0) for c in range(len(classes))])
        centred = feats - means[ref_y[fit]]
        cov = centred.T @ centred / (len(feats) - 1)
        cov = 0.9 * cov + 0.1 * np.diag(np.diag(cov)) + 1e-6 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
        precision = np.linalg.inv(cov)

        def score(h):
            d = h[:, None, :] - means[None]
            return np.einsum("ncd,de,nce->nc", d, precision, d).min(1)

        return score

    def knn_fn(k=10):
        train_h = ref_hidden[fit] / (np.linalg.norm(ref_hidden[fit], axis=1, keepdims=True) + 1e-9)

        def score(h):
            sims = (h / (np.linalg.norm(h, axis=1, keepdims=True) + 1e-9)) @ train_h.T
            return 1 - np.sort(sims, axis=1)[:, -k:].mean(1)

        return score

    temperature = model.calibration["temperature"]
    val_scores = cal.novelty_scores(ref_logits[val], temperature)
    test_scores = cal.novelty_scores(logits, temperature)
    for name, fn in (("mahalanobis", mahalanobis_fn()), ("knn", knn_fn())):
        val_scores[name], test_scores[name] = fn(ref_hidden[val]), fn(hidden)
    rows = []
    for name, values in test_scores.items():
        threshold = np.quantile(val_scores[name], 1 - args.rate)
        unknown = values > threshold
        rows.append(
            {
                "score": name,
                "auroc": roc_auc_score(novel, values),
                "novel_recall": unknown[novel].mean(),
                "known_accuracy": (right & ~unknown)[~novel].mean(),
                "known_unknown": unknown[~novel].mean(),
            }
        )
    table = pd.DataFrame(rows)
    print(
        f"{args.data.name}: {args.leave_out} left out, fold {args.fold}; {(~novel).sum()} known and {novel.sum()} "
        f"novel test cells; known accuracy without 'unknown' {right[~novel].mean():.3f}; temperature "
        f"{temperature:.3f}; thresholds for {args.rate:.0%} false unknowns on {val.size} validation cells"
    )
    print(table.round(3).to_string(index=False))
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.write_text(
            json.dumps(
                {"args": vars(args) | {"data": str(args.data), "out": str(args.out)}, "rows": rows},
                indent=1,
                default=float,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
