"""Parameter documentation the tools share, filled into their docstrings by :func:`scbert_tl._docs.doc_params`.

Each fragment is written as :mod:`scbert_tl._docs` describes: numpydoc entries at a parameter's
indentation, the first line without it.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------- inference tools
doc_cells = """\
adata
        Cells (raw counts or log-normalised; binned for the model's panel when needed).
    model
        A pretrained or fine-tuned :class:`~scbert_tl.ScBERT`, a registry name, or a saved model's path."""

doc_inputs = """\
gene_key, layer, use_raw
        Input choices of :func:`scbert_tl.pp.bin`, used when ``adata`` is binned for the model
        (default: those of the last ``pp.bin`` call, else ``adata.X`` and ``adata.var_names``)."""

doc_batch_size = """\
batch_size
        Cells per forward pass (default: the setting)."""

doc_device = """\
device
        Compute device (default: the setting)."""

doc_precision = """\
precision
        Autocast precision (default: bf16 on CUDA, float32 on CPU)."""

doc_copy = """\
copy
        Return a copy instead of writing into ``adata``."""

# ---------------------------------------------------------------------------------------------- evaluation protocols
doc_labelled = """\
adata
        Labelled cells (raw counts or log-normalised).
    label_key
        Column of ``adata.obs`` with the cell types."""

doc_model = """\
model
        Starting point of :func:`~scbert_tl.tl.finetune` (default: a new compact model)."""

doc_folds = f"""{doc_model}
    n_splits
        Folds of the split into training and test cells.
    folds
        The folds to run (default: the first only; ``None``: all)."""

doc_baselines = """\
baselines
        ``"l1_logistic"`` and/or ``"celltypist"``, as in :func:`~scbert_tl.tl.cross_validate`."""

doc_finetune_kwargs = """\
finetune_kwargs
        Further arguments of :func:`~scbert_tl.tl.finetune`."""

doc_key_added = """\
key_added
        Key in ``adata.uns`` for the results."""

#: Every fragment above by name: ``@doc_params(**FRAGMENTS)`` fills whichever a docstring names.
FRAGMENTS = {name: text for name, text in globals().items() if name.startswith("doc_")}
