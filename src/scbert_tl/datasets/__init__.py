"""Downloadable assets (gene panels, gene2vec, pretrained weights) through one verified pooch registry.

Files are cached in ``scbert.settings.cachedir``; set ``SCBERT_DATA_DIR`` to choose the folder (a
pre-filled folder works offline).
"""

from ._assets import gene2vec_matrix, hgnc_table, panel_genes, read_gene2vec, read_hgnc
from ._registry import REGISTRY, Asset, IntegrityError, available, fetch, git_blob_sha1

__all__ = [
    "REGISTRY",
    "Asset",
    "IntegrityError",
    "available",
    "fetch",
    "gene2vec_matrix",
    "git_blob_sha1",
    "hgnc_table",
    "panel_genes",
    "read_gene2vec",
    "read_hgnc",
]
