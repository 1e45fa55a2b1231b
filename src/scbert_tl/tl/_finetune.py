"""``scbert.tl.finetune``: train a cell type classifier on labelled cells."""

from __future__ import annotations

import logging
from dataclasses import fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from ..data import UNKNOWN, class_order, gene_ids, input_params
from ..train._calibration import calibrate
from ..train._finetune import FinetuneOptions, fit_classifier, options_dict
from ..train._inference import check_compute
from ._data import tokens_for
from ._depth import depth_augmentation
from ._resolve import NEW_MODEL_FINETUNE, TRAINED_FINETUNE, new_model_epochs, resolve_model

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from .._scbert import ScBERT

logger = logging.getLogger(__name__)


# text that stands for a missing label (a NaN or None turned into a string, an empty cell of a table)
MISSING_LABELS = ("", "nan", "none", "null", "na", "n/a", "<na>")


def check_labels_present(col: pd.Series, label_key: str) -> None:
    """Refuse missing labels: NaN, and text that stands for one (``""``, ``"nan"``, ``"None"``, ...)."""
    missing = col.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} cells have no label in adata.obs[{label_key!r}]; drop them first "
            f"(adata = adata[adata.obs[{label_key!r}].notna()].copy()) or give them a label."
        )
    text = col.astype(str).str.strip()
    placeholder = text.str.lower().isin(MISSING_LABELS).to_numpy()
    if placeholder.any():
        raise ValueError(
            f"{int(placeholder.sum())} cells have the label {sorted(set(text[placeholder]))} in "
            f"adata.obs[{label_key!r}]: text that stands for a missing value (e.g. a NaN turned into 'nan' by "
            ".astype(str)), which would become a cell type of its own. Give those cells their type, or drop them: "
            f"adata = adata[~adata.obs[{label_key!r}].astype(str).str.strip().str.lower().isin({list(MISSING_LABELS)})]"
            ".copy()"
        )


def _labels(adata: AnnData, label_key: str) -> tuple[np.ndarray, list[str]]:
    if label_key not in adata.obs:
        raise KeyError(f"label_key={label_key!r} is not a column of adata.obs; columns are {list(adata.obs.columns)}.")
    col = adata.obs[label_key]
    check_labels_present(col, label_key)
    classes = class_order(col)
    if UNKNOWN in classes:
        raise ValueError(f"The label {UNKNOWN!r} is reserved for cells of no known type; rename that class.")
    if len(classes) < 2:
        raise ValueError(
            f"adata.obs[{label_key!r}] has {len(classes)} class ({classes}); a classifier needs at least two."
        )
    index = {c: i for i, c in enumerate(classes)}
    return col.astype(str).map(index).to_numpy(dtype=np.int64), classes


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation rows, each class split in proportion (classes of one cell stay in training)."""
    val = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(fraction * rows.size))
        n_val = min(max(n_val, 1), rows.size - 1) if rows.size >= 2 else 0
        val.append(rows[:n_val])
    val_rows = np.sort(np.concatenate(val))
    train_rows = np.setdiff1d(np.arange(labels.size), val_rows)
    return train_rows, val_rows


def _validation_rows(
    adata: AnnData, labels: np.ndarray, validation: float | str | Sequence, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(validation, float | int) and not isinstance(validation, bool):
        if not 0 <= validation < 1:
            raise ValueError(f"validation must be a fraction in [0, 1), got {validation}.")
        if validation == 0:
            return np.arange(labels.size), np.array([], dtype=np.int64)
        return stratified_split(labels, float(validation), rng)
    if isinstance(validation, str):
        if validation not in adata.obs:
            raise KeyError(f"validation={validation!r} is not a column of adata.obs.")
        mask = adata.obs[validation].to_numpy()
        if mask.dtype != bool:
            raise ValueError(f"adata.obs[{validation!r}] must be boolean (True = validation cell).")
    else:
        idx = pd.Index(adata.obs_names).get_indexer(pd.Index(validation))
        if (idx < 0).any():
            raise ValueError("validation lists cells that are not in adata.obs_names.")
        mask = np.zeros(adata.n_obs, dtype=bool)
        mask[idx] = True
    if mask.all() or not mask.any():
        raise ValueError("The validation cells must be a non-empty, proper subset of the cells.")
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _measured_ids(genes_measured_in: AnnData | Sequence[str] | None) -> list[str] | None:
    """The gene identifiers of ``genes_measured_in`` (an AnnData or a list of identifiers)."""
    from anndata import AnnData

    if genes_measured_in is None:
        return None
    if isinstance(genes_measured_in, AnnData):
        return list(map(str, gene_ids(genes_measured_in, input_params(genes_measured_in).get("gene_key"))))
    if isinstance(genes_measured_in, str) or not all(isinstance(g, str) for g in genes_measured_in):
        raise TypeError("genes_measured_in must be an AnnData or a list of gene identifiers (str).")
    if len(genes_measured_in) == 0:
        raise ValueError("genes_measured_in is empty; pass the query's gene identifiers, or leave it out.")
    return list(genes_measured_in)


def finetune(
    adata: AnnData,
    label_key: str,
    *,
    model: str | os.PathLike | ScBERT = "compact",
    validation: float | str | Sequence[str] = 0.1,
    epochs: int | None = None,
    batch_size: int = 32,
    lr: float | None = None,
    weight_decay: float = 0.01,
    accumulate: int = 1,
    patience: int | None = None,
    class_weight: Literal["balanced", "sampled"] | None = "sampled",
    trainable: Literal["all", "original", "head"] | None = None,
    select_on: Literal["balanced_probability", "macro_f1", "loss", "accuracy"] = "balanced_probability",
    mask_genes: float | None = None,
    downsample: float | None = None,
    gene_bias: float = 0.0,
    genes_measured_in: AnnData | Sequence[str] | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    device: str | None = None,
    precision: str | None = None,
    rng: int = 0,
    split_key: str | None = "scbert_split",
) -> ScBERT:
    """Train a cell type classifier on labelled cells.

    A stratified share of the cells (``validation``) is held out; the epoch with the best validation
    score is kept and training stops early when it no longer improves. These validation cells are
    used for model selection and calibration only: measure accuracy on cells the model never saw (e.g. with
    :func:`scbert_tl.tl.annotate` on a separate query).

    After training, a temperature for calibrated probabilities is fitted on the validation cells,
    and the distribution of the novelty score on them is kept, so that :func:`~scbert_tl.tl.annotate`
    can choose its ``"unknown"`` threshold for a target rate of false unknowns (see
    ``calibration`` of :class:`~scbert_tl.ScBERT`; without validation cells there is none).

    Parameters
    ----------
    adata
        Labelled cells. Binned for the model's panel first if needed (:func:`scbert_tl.pp.bin`).
    label_key
        Column of ``adata.obs`` with the cell types.
    model
        Where to start. ``"compact"`` (the default, as in ``scbert finetune``): a new CPU-sized model over
        at most 2,000 panel genes of ``adata`` (the 50 best markers of each type among the training cells,
        then the most variable genes), trained from scratch; it runs offline on a laptop CPU (it needs
        only the gene panel, a small cached asset). ``"scbert-panglao"``: the published pretrained
        weights in the full configuration: a download and a GPU workload, so chosen explicitly. Or an
        :class:`~scbert_tl.ScBERT` (copied, not changed), or the path of a saved model.
    validation
        Fraction of cells held out (stratified by label), a boolean ``adata.obs`` column (True =
        validation), or a list of obs names.
    epochs
        Maximum passes over the training cells (the cosine schedule ends with them). Default for a new
        model: about 12,000 cells seen in all, between 6 and 20 epochs (20 up to 600 training cells, 15 for
        800, 6 from 1,850); 20 when starting from trained weights.
    batch_size
        Cells per forward pass.
    lr
        Peak learning rate (AdamW, linear warm-up, cosine decay). Default 1e-3 for a new model,
        1e-4 when starting from trained weights.
    weight_decay
        AdamW weight decay of the weight matrices (norms, biases and embeddings are not decayed).
    accumulate
        Micro-batches per optimiser step (the update equals one batch of ``batch_size * accumulate``).
    patience
        Epochs without validation improvement before stopping. Default 3 for a new model, 5 when
        starting from trained weights. With ``class_weight="sampled"`` the epochs of the first phase do
        not count: training always reaches the class-balanced epochs, where rare types are learnt.
    class_weight
        How rare types are given their weight. ``"sampled"`` (the default): the first half of the epochs
        shuffle the cells as they come, so the network learns from every cell of the large types; the
        other half draw their cells with replacement, every class equally likely, so that a rare type's
        few cells are seen (each time differently augmented) as often as a large type's, with an
        unweighted loss;
        ``"balanced"`` weights the loss by inverse class frequency instead (the earlier default);
        ``None`` does neither.
    trainable
        ``"all"`` (every weight but a fixed gene2vec embedding), ``"original"`` (the published scheme:
        the classifier head, the final norm and the second-to-last block) or ``"head"``. Default:
        ``"all"`` for a new model, ``"original"`` for the published weights.
    select_on
        Validation metric that selects the epoch. ``"balanced_probability"`` (the default): the
        probability the model gives the true type, averaged over each type's validation cells, then
        over the types. Like macro F1 every type counts the same, so a rare type is not traded for a
        large one; unlike it, every cell's probability counts, so one cell of a rare type crossing the
        decision boundary does not decide the epoch. ``"macro_f1"``, ``"loss"`` (the cross-entropy of
        the validation cells) or ``"accuracy"`` instead. Epochs that tie on the metric are told apart by
        the validation loss; an epoch that improves neither does not reset ``patience``. Against macro F1
        (the earlier default), the balanced probability chose later, better calibrated epochs on
        small references (Darmanis 5-fold macro F1 0.871 against 0.851, calibration error 0.037 against
        0.062) and the same epochs where types had three or four training cells; the loss lost such
        types. See the benchmarks page.
    mask_genes
        Gene masking: each training cell hides a share of its genes, drawn uniformly from
        ``[0, mask_genes]``, behind the ``[MASK]`` token, so that the model learns to read genes a
        query did not measure as unknown rather than as not expressed. A model trained with it feeds
        its unmeasured genes as ``[MASK]`` (the model's ``unmeasured`` becomes ``"mask"``);
        the coverage is logged, as a warning below 90%. A third of the cells keep all genes, a third
        lose genes at random, a third lose the genes least often detected in the training cells
        (queries filtered to their most detected genes). Default: 1 for a new model; 0 (none) for a new
        compact model whose genes are chosen among a query's (``genes_measured_in``: the query measures
        them all, and masking only cost accuracy there: Segerstolpe -> Baron macro F1 0.950 without it
        against 0.933 with it over three seeds), and when starting from trained weights (the published
        preprocessing, unmeasured genes fed as 0).
    downsample
        Depth augmentation: in every training step about half of the cells are thinned (each count kept
        with the same chance, a binomial draw) to a total drawn log-uniformly between ``downsample``
        counts and their own depth, then binned as :func:`scbert_tl.pp.bin` does, so that the model
        meets shallower measurements of its types (a droplet query annotated from a deep reference).
        Needs counts (raw, or normalised values from which ``pp.bin`` recovers them); otherwise it is
        skipped, with a log message. ``0`` turns it off. Default: 500 for a new model; 0 when starting
        from trained weights.
    gene_bias
        With depth augmentation, the thinned cells of each step are also drawn as another protocol
        would measure them: one capture factor per gene for the step, ``exp(N(0, gene_bias**2))``
        (a Poisson draw of ``count * p * factor``), as full-length, droplet and other protocols
        measure each gene with its own efficiency. For a reference and a query of different protocols
        (e.g. Smart-seq2 and droplets), ``0.5`` measured best; it also made a model less robust to a
        query that lacks most of its genes, so it is off (``0``) by default. Needs ``downsample > 0``.
    genes_measured_in
        The data the model is for, when it is known at training time: a query AnnData (its gene
        identifiers: ``var[gene_key]`` of its last :func:`scbert_tl.pp.bin`, else its var names; its
        expression is not read) or a list of gene identifiers. A new compact model then takes its
        genes among those the query measures, so that the query has every model gene and none is fed
        as ``[MASK]`` (as a baseline fitted on the shared genes). Only with ``model="compact"``; the
        number of identifiers is recorded in ``provenance["genes_measured_in"]``.
    gene_key, layer, use_raw
        Input choices of :func:`scbert_tl.pp.bin`, used when ``adata`` is binned for the model
        (default: those of the last ``pp.bin`` call, else ``adata.X`` and ``adata.var_names``).
    device
        ``"cpu"``, ``"cuda"``, ... (default: :attr:`scbert.settings.device <scbert_tl._settings.ScBERTSettings.device>`).
    precision
        ``"float32"``, ``"bfloat16"``, ... (default: bf16 autocast on CUDA, float32 on CPU).
    rng
        Seed for the split, the shuffling, dropout and new weights; CPU runs are deterministic.
    split_key
        Column of ``adata.obs`` to record which cells were used for training and validation
        (``None``: do not write it).

    Returns
    -------
    The fine-tuned model (its ``history`` holds the per-epoch metrics; ``provenance["calibration"]``
    the temperature and the validation cells' negative log-likelihood and expected calibration
    error before and after it, measured on the cells it was fitted on). Writes
    ``adata.obs[split_key]`` (``"train"`` / ``"validation"``), and the bins of
    :func:`scbert_tl.pp.bin` when they were missing.
    """
    passed = locals()  # the arguments, before anything else is bound
    given = {f.name: passed[f.name] for f in fields(FinetuneOptions) if f.name in passed}  # all but warmup, seed
    labels, classes = _labels(adata, label_key)
    dev, dtype = check_compute(device, precision)  # before anything is written
    net_rng = np.random.default_rng(rng)
    train_rows, val_rows = _validation_rows(adata, labels, validation, net_rng)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng)
        params = input_params(adata, gene_key=gene_key, layer=layer, use_raw=use_raw)
        marker_labels = labels.copy()
        marker_labels[val_rows] = -1  # a new compact model's marker genes come from the training cells alone
        m = resolve_model(
            model, adata, seed=rng, params=params, measured=_measured_ids(genes_measured_in), labels=marker_labels
        )
        options = _options(m, n_train=train_rows.size, query_known=genes_measured_in is not None, seed=rng, **given)
        if options.mask_genes > 0:  # the model learns [MASK] as "not measured": feed unmeasured genes that way
            m.unmeasured = "mask"
        tokens = tokens_for(adata, m, **params)
        if m.classes != classes:  # a new head, unless the model already classifies exactly these types
            m.network.add_classifier(len(classes))
            m.classes = classes
        depth = (
            depth_augmentation(
                adata,
                m,
                tokens,
                train_rows,
                min_depth=options.downsample,
                gene_bias=options.gene_bias,
                seed=rng,
                **params,
            )
            if options.downsample > 0
            else None
        )
        history = fit_classifier(
            m.network, tokens, labels, train_rows, val_rows, options, device=dev, dtype=dtype, depth=depth
        )
    # calibrated probabilities and the "unknown" threshold come from the validation cells
    m.calibration = (
        calibrate(m.network, tokens, labels, val_rows, device=dev, precision=precision) if val_rows.size else None
    )
    m.history = history
    selected = _record(m, label_key, train_rows, val_rows, options, dev, dtype)
    _write_split(adata, split_key, val_rows)
    logger.info(
        "finetune: selected epoch %d, validation accuracy %.3f, macro F1 %.3f (model selection only, not a test score)",
        selected["epoch"],
        selected.get("val_accuracy", float("nan")),
        selected.get("val_macro_f1", float("nan")),
    )
    return m


def _options(m: ScBERT, *, n_train: int, query_known: bool, **given: Any) -> FinetuneOptions:
    """The run's options: those given, the rest from the defaults for a new model or for trained weights.

    A new model whose genes were chosen among a query's (``query_known``) is not trained with gene masking:
    the query measures every one of its genes.
    """
    new_model = m.provenance.get("source") in ("compact", "new")
    defaults = NEW_MODEL_FINETUNE if new_model else TRAINED_FINETUNE
    if new_model and given["epochs"] is None:
        given["epochs"] = new_model_epochs(n_train)
    if new_model and query_known and given["mask_genes"] is None:
        given["mask_genes"] = 0.0
    for key in ("epochs", "patience", "lr", "mask_genes", "downsample"):
        if given[key] is None:
            given[key] = defaults[key]
    if given["trainable"] is None:
        given["trainable"] = "all" if new_model else "original"
    return FinetuneOptions(**given)


def _record(
    m: ScBERT,
    label_key: str,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    options: FinetuneOptions,
    dev: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Write the run into the model's provenance; returns the selected epoch's history record."""
    selected = next((h for h in m.history if h["selected"]), m.history[-1])
    m.provenance.update(
        {
            "finetuned": datetime.now(UTC).isoformat(timespec="seconds"),
            "label_key": label_key,
            "n_train": int(train_rows.size),
            "n_validation": int(val_rows.size),
            "options": options_dict(options),
            "selected_epoch": int(selected["epoch"]),
            "validation": {k[4:]: v for k, v in selected.items() if k.startswith("val_")},
            "device": str(dev),
            "precision": str(dtype).replace("torch.", ""),
            "calibration": None
            if m.calibration is None
            else {"temperature": m.calibration["temperature"], **m.calibration["validation"]},
        }
    )
    return selected


def _write_split(adata: AnnData, split_key: str | None, val_rows: np.ndarray) -> None:
    """Record in ``adata.obs[split_key]`` which cells trained and which selected the model."""
    if split_key is None:
        return
    if split_key in adata.obs:
        logger.info("finetune: replacing adata.obs[%r]", split_key)
    split = np.full(adata.n_obs, "train", dtype=object)
    split[val_rows] = "validation"
    adata.obs[split_key] = pd.Categorical(split, categories=["train", "validation"])
