"""Labels at a shared level, for scoring a dataset labelled at another resolution (:func:`~scbert_tl.tl.dataset_transfer`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)


def shared_labels(
    adatas: list[AnnData], names: list[str], label_key: str, label_map: Mapping[str, str | None] | str | None
) -> list[np.ndarray]:
    """Each dataset's cells at the shared level (``None``: a cell left out)."""
    out = []
    if label_map is None or isinstance(label_map, Mapping):
        mapping = {} if label_map is None else {str(k): v for k, v in label_map.items()}
        for v in mapping.values():
            if v is not None and not isinstance(v, str):
                raise ValueError(f"label_map values must be labels (str) or None (leave out), got {v!r}.")
        for a in adatas:
            labels = a.obs[label_key].astype(str).to_numpy()
            out.append(np.array([mapping.get(t, t) for t in labels], dtype=object))
        return out
    if not isinstance(label_map, str):
        raise TypeError(f"label_map must be a dict, the name of an obs column or None, got {type(label_map).__name__}.")
    have = [label_map in a.obs for a in adatas]
    if not any(have):
        raise KeyError(
            f"label_map={label_map!r} names an obs column that none of the datasets has; pass the column of the "
            "shared labels, or a dict from labels to shared labels."
        )
    for a, name, has in zip(adatas, names, have, strict=True):
        if has:
            col = a.obs[label_map]
            out.append(np.where(col.isna().to_numpy(), None, col.astype(str).to_numpy()).astype(object))
        else:
            logger.info(
                "dataset_transfer: %s has no obs[%r]; its %r labels are taken as shared labels",
                name,
                label_map,
                label_key,
            )
            out.append(a.obs[label_key].astype(str).to_numpy().astype(object))
    return out


def to_shared(own: np.ndarray, shared: np.ndarray, name: str) -> dict[str, str]:
    """The function from a dataset's own labels to its shared labels (each label must have one)."""
    mapping: dict[str, str] = {}
    for o, s in sorted(set(zip(own, shared, strict=True))):
        if mapping.setdefault(o, s) != s:
            raise ValueError(
                f"In {name}, the cells of type {o!r} have more than one shared label ({mapping[o]!r}, {s!r}); a "
                "type must map to one shared type (or be left out)."
            )
    return mapping


def mapped(labels: np.ndarray, mapping: dict[str, str | None]) -> np.ndarray:
    return np.array([mapping.get(t, t) for t in np.asarray(labels, dtype=str)], dtype=object)


def shared_prediction(pred: Any, mapping: dict[str, str | None]) -> tuple[np.ndarray, np.ndarray]:
    """The predicted types at the shared level and the probability of each (summed over the types that share it)."""
    labels = mapped(pred.labels, mapping)
    if pred.probabilities is None or not mapping:
        return labels, pred.confidence
    shared_of_class = mapped(np.asarray(pred.classes, dtype=str), mapping)
    same = shared_of_class[None, :] == labels[:, None]
    return labels, np.minimum(1.0, (pred.probabilities * same).sum(axis=1))
