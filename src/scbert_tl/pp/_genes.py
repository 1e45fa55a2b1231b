"""Align a user's genes to a model panel: symbols, case, HGNC previous/alias symbols, Ensembl IDs."""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._settings import settings

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

logger = logging.getLogger(__name__)

ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")
METHODS = ("exact", "case", "nomenclature", "ensembl")


@dataclass
class Alignment:
    """Where each user gene goes in the panel.

    Attributes
    ----------
    target
        Per user gene, the panel position its expression is added to, or -1.
    panel_index
        Per user gene, the panel position it carries in the bins layer, or -1. Where several user
        genes map to one panel gene, only the first carries it (their expression is summed there).
    method
        Per user gene, how it was matched (one of ``METHODS``) or ``""``.
    shadowed
        User genes that map to a panel gene already matched by a better method (not used).
    """

    target: np.ndarray
    panel_index: np.ndarray
    method: np.ndarray
    shadowed: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        """User genes whose expression is summed into another user gene's panel position."""
        return int(((self.target >= 0) & (self.panel_index < 0)).sum())

    def counts(self) -> dict[str, int]:
        """User genes matched per method."""
        return {m: int((self.method == m).sum()) for m in METHODS}


def is_ensembl(ids: Sequence[str]) -> np.ndarray:
    """Which identifiers look like Ensembl gene IDs (``ENSG00000141510``, versions allowed)."""
    return np.fromiter((bool(ENSEMBL.match(str(i))) for i in ids), dtype=bool, count=len(ids))


class _Nomenclature:
    """Name -> HGNC ID, preferring approved symbols, then previous, then alias symbols (unambiguous only)."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.approved: dict[str, str] = {}
        prev: dict[str, set[str]] = {}
        alias: dict[str, set[str]] = {}
        self.ensembl: dict[str, str] = {}
        for hid, sym, prv, als, ens in table[
            ["hgnc_id", "symbol", "prev_symbol", "alias_symbol", "ensembl_gene_id"]
        ].itertuples(index=False):
            if sym:
                self.approved[sym.upper()] = hid
            for name in filter(None, prv.split("|")):
                prev.setdefault(name.strip().upper(), set()).add(hid)
            for name in filter(None, als.split("|")):
                alias.setdefault(name.strip().upper(), set()).add(hid)
            if ens:
                self.ensembl[ens] = hid
        self.prev = {k: next(iter(v)) for k, v in prev.items() if len(v) == 1}
        self.alias = {k: next(iter(v)) for k, v in alias.items() if len(v) == 1}

    def resolve(self, name: str) -> str | None:
        key = name.upper()
        return self.approved.get(key) or self.prev.get(key) or self.alias.get(key)


def align_genes(ids: Sequence[str], panel: Sequence[str], *, nomenclature: pd.DataFrame | None = None) -> Alignment:
    """Match user gene identifiers to panel genes, best method first.

    Parameters
    ----------
    ids
        The user's gene identifiers (symbols or Ensembl IDs), one per var.
    panel
        The model's panel genes, in model order.
    nomenclature
        An HGNC table (:func:`scbert_tl.datasets.read_hgnc`) for previous/alias symbols and Ensembl
        IDs; without it only exact and case-insensitive symbol matches are made.

    Returns
    -------
    The alignment. A panel gene is claimed by the best method that reaches it (exact, then case,
    then nomenclature, then Ensembl); user genes matching it by the same method are summed into
    it, user genes reaching it only by a worse method are left out and listed as shadowed.
    """
    ids = [str(i).strip() for i in ids]
    n = len(ids)
    exact = {g: i for i, g in enumerate(panel)}
    upper: dict[str, int] = {}
    clashes = set()
    for i, g in enumerate(panel):
        key = g.upper()
        if key in upper:
            clashes.add(key)
        upper[key] = i
    for key in clashes:  # panel genes that differ only by case: only exact matches reach them
        del upper[key]

    candidates: list[list[tuple[int, int]]] = [[] for _ in METHODS]  # per method: (user gene, panel position)
    for j, name in enumerate(ids):
        if name in exact:
            candidates[0].append((j, exact[name]))
        elif name.upper() in upper:
            candidates[1].append((j, upper[name.upper()]))

    if nomenclature is not None:
        nom = _Nomenclature(nomenclature)
        hgnc_to_panel: dict[str, int] = {}
        ambiguous = set()
        for i, g in enumerate(panel):
            hid = nom.resolve(g)
            if hid is None:
                continue
            if hid in hgnc_to_panel:
                ambiguous.add(hid)
            hgnc_to_panel[hid] = i
        for hid in ambiguous:
            del hgnc_to_panel[hid]
        matched = {j for c in candidates[:2] for j, _ in c}
        for j, name in enumerate(ids):
            if j in matched:
                continue
            if ENSEMBL.match(name):
                hid = nom.ensembl.get(name.split(".")[0])
                tier = 3
            else:
                hid = nom.resolve(name)
                tier = 2
            if hid is not None and hid in hgnc_to_panel:
                candidates[tier].append((j, hgnc_to_panel[hid]))

    target = np.full(n, -1, dtype=np.int64)
    panel_index = np.full(n, -1, dtype=np.int64)
    method = np.full(n, "", dtype=object)
    claimed: dict[int, int] = {}  # panel position -> method tier that claimed it
    shadowed = []
    for tier, pairs in enumerate(candidates):
        for j, pos in pairs:
            if pos in claimed and claimed[pos] < tier:
                shadowed.append(ids[j])
                continue
            if pos not in claimed:
                claimed[pos] = tier
                panel_index[j] = pos
            target[j] = pos
            method[j] = METHODS[tier]
    return Alignment(target=target, panel_index=panel_index, method=method.astype(str), shadowed=shadowed)


@functools.cache
def _registry_nomenclature(cachedir: str) -> pd.DataFrame | None:
    """The registry's HGNC table, or None when it cannot be had: tried once per process (and cache folder)."""
    from .. import datasets

    try:
        return datasets.hgnc_table()
    except (OSError, ValueError) as e:  # offline, blocked, or a bad download (already removed)
        logger.warning(
            "The HGNC nomenclature table could not be fetched (%s). In this session genes are matched by exact and "
            "case-insensitive symbol only: renamed genes (previous or alias symbols) and Ensembl IDs are not aligned, "
            "so fewer genes may match than with the table. To use it offline, download %s elsewhere and set "
            "scbert.settings.hgnc_path to that file (or put it at %s). Not tried again in this process.",
            type(e).__name__,
            datasets.REGISTRY["hgnc-complete-set"].url,
            Path(cachedir) / "hgnc-complete-set",
        )
        return None


@functools.cache
def _hgnc_file(path: str, mtime: float) -> pd.DataFrame:
    from .. import datasets

    return datasets.read_hgnc(path)


def nomenclature(aliases: str | os.PathLike | pd.DataFrame | None) -> tuple[pd.DataFrame | None, str]:
    """The nomenclature table ``aliases`` names (see :func:`scbert_tl.pp.bin`) and where it came from, for the record."""
    from .. import datasets

    if aliases is None or aliases is False:
        return None, "not used (aliases=None): exact and case-insensitive symbols only"
    if isinstance(aliases, pd.DataFrame):
        return aliases, "user-supplied table"
    if isinstance(aliases, str) and aliases == "hgnc":
        if settings.hgnc_path is not None:
            path = settings.hgnc_path
            return _hgnc_file(str(path), path.stat().st_mtime), f"HGNC table {path} (settings.hgnc_path)"
        table = _registry_nomenclature(str(settings.cachedir))
        if table is None:
            return None, "unavailable (HGNC table could not be fetched): exact and case-insensitive symbols only"
        return table, f"HGNC complete set ({datasets.REGISTRY['hgnc-complete-set'].url})"
    return datasets.read_hgnc(aliases), f"HGNC-format table {aliases}"
