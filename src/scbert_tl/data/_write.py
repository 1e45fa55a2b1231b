"""Results written into an open ``.h5ad`` file a part at a time (obs columns, obsm arrays, uns records), with h5py.

The streamed shell commands copy their input and add their results to the copy this way, never holding
the whole file in memory.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import h5py

logger = logging.getLogger(__name__)


def write_obs_column(f: h5py.File, name: str, values: Any) -> None:
    """Write (or replace) the column ``name`` of the ``obs`` of an open ``.h5ad`` file."""
    from anndata.io import write_elem

    obs = f["obs"]
    if name in obs:
        logger.info("replacing obs[%r] of the output", name)
        del obs[name]
    write_elem(obs, name, values)
    order = [str(c) for c in np.atleast_1d(obs.attrs.get("column-order", []))]
    if name not in order:
        obs.attrs["column-order"] = [*order, name]


def create_obsm(f: h5py.File, name: str, shape: tuple[int, int]) -> h5py.Dataset:
    """An empty float32 ``obsm[name]`` array in an open ``.h5ad`` file, to be filled a chunk at a time."""
    obsm = _dict_group(f, "obsm")
    if name in obsm:
        logger.info("replacing obsm[%r] of the output", name)
        del obsm[name]
    ds = obsm.create_dataset(name, shape=shape, dtype=np.float32)
    ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return ds


def update_uns(f: h5py.File, key: str, update: dict[str, Any]) -> None:
    """Merge ``update`` into ``uns[key]`` of an open ``.h5ad`` file (its ``"params"`` merged one level deeper)."""
    from anndata.io import read_elem, write_elem

    uns = _dict_group(f, "uns")
    record: dict[str, Any] = {}
    if key in uns:
        with contextlib.suppress(KeyError, TypeError, ValueError, OSError):  # an unreadable old record is replaced
            record = dict(read_elem(uns[key]))
        del uns[key]
    params = {**dict(record.get("params", {})), **dict(update.get("params", {}))}
    record.update(update)
    if params:
        record["params"] = params
    write_elem(uns, key, record)


def _dict_group(f: h5py.File, name: str) -> h5py.Group:
    """The group ``name`` (``obsm``, ``uns``) of an ``.h5ad`` file, created with anndata's encoding when missing."""
    if name not in f:
        f.create_group(name).attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    return f[name]
