"""The user-facing model object: a network with its gene panel, bins, class names and provenance."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ._files import as_umask_allows
from ._paths import check_model_target, is_hdf5
from ._version import __version__
from .datasets._registry import file_sha256
from .model import CheckpointError, ScBERTConfig, ScBERTNetwork, infer_config, load_into, to_own_state_dict

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
Normalization = Literal["library", "panel"]
Unmeasured = Literal["zero", "mask"]
PRETRAINED = {"scbert-panglao": ("scbert-panglao-weights", "scbert-panglao")}
# the optional arguments of ScBERT that a saved model or a checkpoint records (absent ones take the defaults)
_RECORD_KEYS = ("classes", "panel", "normalization", "unmeasured", "provenance", "history", "calibration")


class ScBERT:
    """An scBERT model: the network, the genes it reads (in order), its bins and its class names.

    Create one with :meth:`~scbert_tl.ScBERT.new`, :meth:`~scbert_tl.ScBERT.load` or
    :meth:`~scbert_tl.ScBERT.from_pretrained`, or get one back from
    :func:`scbert_tl.tl.finetune` / :func:`scbert_tl.tl.pretrain`.

    Parameters
    ----------
    network
        The torch network.
    genes
        Gene symbols of the panel, in the order of the network's positions.
    classes
        Class names of the classifier head, in output order (``None`` without a classifier).
    panel
        Registry name of the panel, when it is a registered one (e.g. ``"scbert-panglao"``).
    normalization
        What a cell's expression is normalised by before binning: ``"library"`` (its total counts
        over all measured genes) or ``"panel"`` (its total over the panel genes, the preprocessing of
        the original scBERT and of its published weights). See :func:`scbert_tl.pp.bin`.
    unmeasured
        How a panel gene that the data did not measure is fed: ``"zero"`` (as not expressed, what the
        published scBERT saw) or ``"mask"`` (as unknown, the ``[MASK]`` token; for models fine-tuned
        with gene masking, which :func:`scbert_tl.tl.finetune` sets).
    provenance
        Where the weights come from and how they were trained (saved with the model).
    history
        Training history, one dict per epoch (saved with the model).
    calibration
        What :func:`~scbert_tl.tl.finetune` fitted on the validation cells for calibrated
        probabilities and ``"unknown"`` calls: the ``temperature``, the novelty ``score`` and its
        validation ``quantiles`` (saved with the model; ``None`` for a model without it, such as an
        original checkpoint).
    """

    def __init__(
        self,
        network: ScBERTNetwork,
        genes: Sequence[str],
        *,
        classes: Sequence[str] | None = None,
        panel: str | None = None,
        normalization: Normalization = "library",
        unmeasured: Unmeasured = "zero",
        provenance: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
        calibration: dict[str, Any] | None = None,
    ) -> None:
        genes = [str(g) for g in genes]
        c = network.config
        if len(genes) != c.n_genes:
            raise CheckpointError(
                f"The model has {c.n_genes} gene positions but {len(genes)} gene names were given; "
                "pass the gene panel the weights were trained on."
            )
        if len(set(genes)) != len(genes):
            dup = sorted({g for g in genes if genes.count(g) > 1})[:5]
            raise CheckpointError(
                f"The gene panel has duplicated symbols, e.g. {dup}; each position needs its own gene."
            )
        if classes is not None:
            classes = [str(x) for x in classes]
            if len(classes) != c.n_classes:
                raise CheckpointError(
                    f"The classifier has {c.n_classes} outputs but {len(classes)} class names were given."
                )
        elif c.n_classes:
            raise CheckpointError("A model with a classifier head needs its class names.")
        self.network = network
        self.genes = genes
        self.classes = classes
        if normalization not in ("library", "panel"):
            raise ValueError(f"normalization must be 'library' or 'panel', got {normalization!r}.")
        self.panel = panel
        self.normalization = normalization
        if unmeasured not in ("zero", "mask"):
            raise ValueError(f"unmeasured must be 'zero' or 'mask', got {unmeasured!r}.")
        self.unmeasured = unmeasured
        self.provenance = dict(provenance or {})
        self.history = list(history or [])
        self.calibration = dict(calibration) if calibration else None

    # ------------------------------------------------------------------------------------------ info
    @property
    def config(self) -> ScBERTConfig:
        """The architecture (:class:`~scbert_tl.model.ScBERTConfig`)."""
        return self.network.config

    @property
    def n_bins(self) -> int:
        """Expression bins the model was trained with."""
        return self.config.n_bins

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.network.token_emb.weight.device

    def to(self, device: str | torch.device) -> ScBERT:
        """Move the weights to ``device`` (in place); returns self."""
        self.network.to(device)
        return self

    def __repr__(self) -> str:
        c = self.config
        head = f"{c.n_classes} classes" if c.n_classes else "no classifier"
        return (
            f"ScBERT({len(self.genes)} genes{f' ({self.panel})' if self.panel else ''}, depth={c.depth}, "
            f"dim={c.dim}, heads={c.heads}, {c.n_bins} bins, {head})"
        )

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def new(
        cls,
        genes: Sequence[str],
        *,
        config: ScBERTConfig | None = None,
        gene_embedding: np.ndarray | None = None,
        panel: str | None = None,
        seed: int = 0,
        **config_kwargs: Any,
    ) -> ScBERT:
        """A freshly initialised model over ``genes``.

        Parameters
        ----------
        genes
            Panel gene symbols, in model order.
        config
            Architecture; ``n_genes`` is set from ``genes``. Keyword arguments override its fields.
        gene_embedding
            ``(len(genes) + 1, dim)`` fixed gene embedding (e.g. from :func:`scbert_tl.datasets.gene2vec_matrix`).
            Without it the gene embedding is learned.
        panel
            Registry name of the panel, if it is one.
        seed
            Seed of the initial weights and random projections.
        **config_kwargs
            Fields of :class:`~scbert_tl.model.ScBERTConfig`.
        """
        base = config.to_dict() if config is not None else {}
        base.update(config_kwargs)
        base["n_genes"] = len(genes)
        base.setdefault("gene_emb_trainable", gene_embedding is None)
        cfg = ScBERTConfig(**base)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = ScBERTNetwork(cfg)
        if gene_embedding is not None:
            emb = torch.as_tensor(np.asarray(gene_embedding, dtype=np.float32))
            if tuple(emb.shape) != (cfg.seq_len, cfg.dim):
                raise ValueError(f"gene_embedding must have shape {(cfg.seq_len, cfg.dim)}, got {tuple(emb.shape)}.")
            with torch.no_grad():
                network.gene_emb.weight.copy_(emb)
                network.gene_emb.weight[-1].zero_()
        prov = {"source": "new", "seed": seed, "created": datetime.now(UTC).isoformat(timespec="seconds")}
        return cls(network, genes, panel=panel, provenance=prov)

    @classmethod
    def from_pretrained(cls, name: str = "scbert-panglao") -> ScBERT:
        """Download (once, verified) and load published weights by registry name.

        Parameters
        ----------
        name
            ``"scbert-panglao"``: scBERT pretrained on Panglao (full config, 16,906 genes, gene2vec).
        """
        from . import datasets

        if name not in PRETRAINED:
            raise KeyError(f"Unknown pretrained model {name!r}; available: {sorted(PRETRAINED)}.")
        weights, panel = PRETRAINED[name]
        path = datasets.fetch(weights)
        model = cls.load(path, genes=datasets.panel_genes(panel))
        model.panel = panel
        model.provenance.update({"source": name, "url": datasets.REGISTRY[weights].url})
        return model

    # ------------------------------------------------------------------------------------------ load
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        genes: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        map_location: str | torch.device = "cpu",
    ) -> ScBERT:
        """Load a model saved by :meth:`save`, an original scBERT checkpoint, or a nano-scBERT conversion.

        The architecture is inferred from the tensor shapes. Original checkpoints may carry a DDP
        ``module.`` prefix. Files are read with ``weights_only=True``: nothing is unpickled.

        Parameters
        ----------
        path
            A directory written by :meth:`save`, a ``.pth``/``.pt`` checkpoint file, or a registry name
            (see :meth:`from_pretrained`).
        genes
            Gene panel of an original-format checkpoint, in model order. Defaults to the published
            scBERT Panglao panel when the checkpoint has 16,906 gene positions.
        classes
            Class names of an original fine-tuned checkpoint, in output order (the ``label_dict`` the
            original scripts pickled separately).
        map_location
            Where to put the weights.
        """
        if isinstance(path, str) and path in PRETRAINED and not Path(path).exists():
            return cls.from_pretrained(path)
        path = Path(path).expanduser()
        if path.is_dir():
            return cls._load_own(path, map_location=map_location)
        if not path.exists():
            raise FileNotFoundError(f"No model at {path}: expected a directory saved by ScBERT.save or a .pth file.")
        _check_torch_file(path)
        obj = _torch_load(path, map_location)
        state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a state dict of tensors (nor one under 'model_state_dict').")
        own, fmt = to_own_state_dict(state)
        cfg = infer_config(own)
        if genes is None:
            if cfg.n_genes != 16906:
                raise CheckpointError(
                    f"{path} has {cfg.n_genes} gene positions; pass genes= (the panel it was trained on, in order)."
                )
            from . import datasets

            genes = datasets.panel_genes("scbert-panglao")
        if cfg.n_classes and classes is None:
            logger.warning(
                "%s has a %d-class classifier but no class names were given (pass classes=, the original "
                "label_dict); using class_0 .. class_%d.",
                path,
                cfg.n_classes,
                cfg.n_classes - 1,
            )
            classes = [f"class_{i}" for i in range(cfg.n_classes)]
        network = ScBERTNetwork(cfg)
        load_into(network, own)
        network.to(map_location).eval()
        prov = {"source": str(path.name), "format": fmt}
        # the original scripts normalised each cell over the panel genes
        return cls(network, genes, classes=classes, normalization="panel", provenance=prov)

    @classmethod
    def _load_own(cls, path: Path, *, map_location: str | torch.device) -> ScBERT:
        cfg_file, weights = path / "config.json", path / "model.pt"
        for f in (cfg_file, weights):
            if not f.exists():
                raise CheckpointError(f"{path} is not a saved scbert-tl model: {f.name} is missing.")
        meta = _read_meta(cfg_file)
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} was saved by a newer scbert-tl (format {meta['format_version']}); upgrade scbert-tl."
            )
        missing = [k for k in ("config", "genes") if k not in meta]
        if missing:
            raise CheckpointError(
                f"{cfg_file} has no {' or '.join(map(repr, missing))} entry: the file is incomplete or was edited; "
                "the model directory cannot be used. Save the model again with ScBERT.save."
            )
        expected = meta.get("model_sha256")
        if expected is None:
            logger.info(
                "%s was saved without a checksum of its weights (by an earlier scbert-tl), so their integrity "
                "cannot be checked. Save it again to add one.",
                path,
            )
        elif file_sha256(weights) != expected:
            raise CheckpointError(
                f"{weights} does not match the SHA-256 recorded in {cfg_file.name} when it was saved: the weights were "
                "changed or corrupted since (a partial copy, a disk error, an interrupted overwrite). Use another copy "
                "of the model, or train it again."
            )
        try:
            cfg = ScBERTConfig.from_dict(meta["config"])
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{cfg_file}: the 'config' entry is not a valid architecture ({e}).") from e
        _check_torch_file(weights)
        state = _torch_load(weights, map_location)
        own, _ = to_own_state_dict(state)
        network = ScBERTNetwork(cfg)
        load_into(network, own)
        network.to(map_location).eval()
        return cls.from_record(network, meta)

    @classmethod
    def from_record(cls, network: ScBERTNetwork, record: dict[str, Any]) -> ScBERT:
        """The model of ``network`` that ``record`` describes (a saved model's config, a pretraining checkpoint's meta)."""
        return cls(network, record["genes"], **{k: record[k] for k in _RECORD_KEYS if k in record})

    def record(self) -> dict[str, Any]:
        """What :meth:`from_record` needs besides the network: the genes and every other model field."""
        return {"genes": self.genes, **{k: getattr(self, k) for k in _RECORD_KEYS}}

    # ------------------------------------------------------------------------------------------ save
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model as a directory: ``config.json`` (architecture, genes, classes, provenance, history, calibration) and ``model.pt`` (state dict).

        ``config.json`` records the SHA-256 of ``model.pt``; :meth:`load` refuses weights that no longer
        match it.

        Parameters
        ----------
        path
            Target directory.
        overwrite
            Replace an existing model there: its ``config.json`` and ``model.pt`` only; other files in the
            folder are kept. Without it an existing non-empty directory is an error, and a folder that
            holds no scbert-tl model is never written into.

        Returns
        -------
        The directory written.
        """
        path = Path(path).expanduser()
        replacing = check_model_target(path, overwrite=overwrite)
        meta = {
            "format": "scbert-tl",
            "format_version": FORMAT_VERSION,
            "scbert_tl_version": __version__,
            "config": self.config.to_dict(),
            **self.record(),
        }
        state = {k: v.detach().cpu() for k, v in self.network.state_dict().items()}
        # New files are written beside their targets, then moved into place. Replacing a model swaps only
        # its own two files (other files in the folder stay): model.pt first, then config.json with its
        # checksum, so that an interruption between the two leaves a model that load() refuses, never a
        # silently wrong one.
        work = path if replacing else Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=_mkparent(path)))
        if not replacing:
            as_umask_allows(work, folder=True)  # mkdtemp's folder is private (0o700)
        tmp_weights, tmp_config = work / f".model.pt.{os.getpid()}.tmp", work / f".config.json.{os.getpid()}.tmp"
        try:
            torch.save(state, tmp_weights)
            meta["model_sha256"] = file_sha256(tmp_weights)
            tmp_config.write_text(json.dumps(meta, indent=1, default=_json_default))
            os.replace(tmp_weights, work / "model.pt")
            os.replace(tmp_config, work / "config.json")
            if not replacing:
                if path.exists():  # an empty folder
                    path.rmdir()
                work.rename(path)
        except BaseException:
            tmp_weights.unlink(missing_ok=True)
            tmp_config.unlink(missing_ok=True)
            if not replacing:
                shutil.rmtree(work, ignore_errors=True)
            raise
        logger.info("Saved %r to %s", self, path)
        return path


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


def _read_meta(cfg_file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); the model directory is corrupt.") from e
    if not isinstance(meta, dict) or meta.get("format") != "scbert-tl":
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{cfg_file} is not an scbert-tl model config (format={found!r}).")
    return meta


def _check_torch_file(path: Path) -> None:
    """Refuse, with a plain message, a file that is not a torch checkpoint at all (text, an .h5ad, ...)."""
    with path.open("rb") as fh:
        head = fh.read(8)
    if is_hdf5(path):
        raise CheckpointError(
            f"{path} is an HDF5 file (an .h5ad?), not a model. Pass a model directory written by ScBERT.save "
            "(config.json + model.pt) or a .pth checkpoint; the data is the other argument."
        )
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise CheckpointError(
            f"{path} is not a torch checkpoint (it starts with {head!r}). Pass a model directory written by "
            "ScBERT.save (config.json + model.pt) or a .pth/.pt file saved by torch.save."
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray | tuple):
        return list(obj)
    raise TypeError(f"Cannot store {type(obj).__name__} in config.json")


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects besides tensors, which scbert-tl will not unpickle (unsafe). "
            "Re-save it as a plain state dict: torch.save(model.state_dict(), 'weights.pth')."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path} could not be read as a torch checkpoint ({e}); it is truncated or corrupt."
        ) from e
