"""Where scBERT's data lives in AnnData objects and ``.h5ad`` files (internal; no public API).

The slot names (:mod:`~scbert_tl.data._slots`), the record :func:`scbert_tl.pp.bin` leaves and the
one check of whether bins are current (:mod:`~scbert_tl.data._record`), the input a tool reads
(:mod:`~scbert_tl.data._inputs`), tokens in a model's panel order (:mod:`~scbert_tl.data._tokens`),
``.h5ad`` files read a part at a time (:mod:`~scbert_tl.data._h5ad`) and written a part at a time
(:mod:`~scbert_tl.data._write`), and the chunks of a streamed run (:mod:`~scbert_tl.data._chunks`).
This layer bins nothing itself (that is :mod:`scbert_tl.pp`) and holds no network code (that is
:mod:`scbert_tl.train`).
"""

from ._chunks import CHUNK_SIZE, available_memory, check_fits, chunk_bounds, is_dask
from ._h5ad import FileMatrix, H5adFile, H5adSource
from ._inputs import gene_ids, in_memory, matrix, matrix_key, rows
from ._labels import class_order
from ._record import (
    bins_record,
    bins_stale,
    find_bins,
    input_fingerprint,
    input_params,
    panel_checksum,
    recorded_input,
    recorded_params,
    write_bins,
)
from ._slots import DEFAULT_KEY, INPUT_KEYS, LAYER, PANEL_INDEX, UNKNOWN
from ._tokens import MemorySource, TokenMatrix, TokenSource, check_col_map, to_panel_csr
from ._write import create_obsm, update_uns, write_obs_column

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_KEY",
    "INPUT_KEYS",
    "LAYER",
    "PANEL_INDEX",
    "UNKNOWN",
    "FileMatrix",
    "H5adFile",
    "H5adSource",
    "MemorySource",
    "TokenMatrix",
    "TokenSource",
    "available_memory",
    "bins_record",
    "bins_stale",
    "check_col_map",
    "check_fits",
    "chunk_bounds",
    "class_order",
    "create_obsm",
    "find_bins",
    "gene_ids",
    "in_memory",
    "input_fingerprint",
    "input_params",
    "is_dask",
    "matrix",
    "matrix_key",
    "panel_checksum",
    "recorded_input",
    "recorded_params",
    "rows",
    "to_panel_csr",
    "update_uns",
    "write_bins",
    "write_obs_column",
]
