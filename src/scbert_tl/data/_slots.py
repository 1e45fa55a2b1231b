"""Where scBERT's data lives in an AnnData object: the slot names the package reads and writes."""

from __future__ import annotations

UNKNOWN = "unknown"  # the label of cells of no known type (annotate) and the reserved class name
DEFAULT_KEY = "scbert"  # default key_added of pp.bin and the tools (documented in their signatures)
LAYER = "scbert_bins"  # adata.layers: int8 tokens in adata's genes
PANEL_INDEX = "scbert_panel_index"  # adata.var: each gene's position in the model panel, or -1
# The field that marks pp.bin's record in adata.uns (whatever its key): the layer its bins are in.
BINS_MARKER = "bins_layer"
# Top-level fields of pp.bin's record; a record at a shared key keeps other tools' fields (e.g. annotate's).
BINS_FIELDS = (
    BINS_MARKER,
    "panel",
    "panel_size",
    "panel_checksum",
    "var_checksum",
    "n_bins",
    "normalize",
    "input",
    "input_kind",
    "fingerprint",
    "coverage",
    "nomenclature",
)
INPUT_KEYS = ("gene_key", "layer", "use_raw")  # the input choices pp.bin records and the tools reuse
