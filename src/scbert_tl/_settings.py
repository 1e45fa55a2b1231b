"""Package-wide settings: device, precision, batch size, workers, threads, kernels, verbosity, cache directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch  # imported when first needed, so that `import scbert_tl` and `scbert --help` stay light

_PRECISIONS = ("auto", "float32", "bfloat16", "float16")
_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}


def _env_flag(name: str, *, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "no", "off")


class ScBERTSettings:
    """Settings for :mod:`scbert_tl`, available as ``scbert.settings``.

    Attributes are validated on assignment, so a typo fails at once rather than deep inside a run.
    """

    def __init__(self) -> None:
        self._device = "auto"
        self._precision = "auto"
        self._batch_size: int | str = "auto"
        self._num_workers = 0
        self._n_threads: int | str = "auto"
        self._onednn = _env_flag("SCBERT_ONEDNN", default=True)
        self._compile = _env_flag("SCBERT_COMPILE", default=False)
        self._verbosity = 2
        logging.getLogger("scbert_tl").setLevel(_LEVELS[self._verbosity])
        self._cachedir: Path | None = None
        self._hgnc_path: Path | None = None

    # device -------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """Compute device, ``"auto"`` (CUDA when available, else CPU) or any :class:`torch.device` string."""
        return self._device

    @device.setter
    def device(self, value: str | torch.device) -> None:
        value = str(value)
        if value != "auto":
            import torch

            try:
                torch.device(value)
            except RuntimeError as e:
                raise ValueError(f"settings.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}.") from e
        self._device = value

    def resolve_device(self, device: str | torch.device | None = None) -> torch.device:
        """Turn ``device`` (or the setting when None) into a concrete :class:`torch.device`."""
        import torch

        device = self._device if device is None else str(device)
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"Device {device!r} was requested but CUDA is not available; use device='cpu'.")
        return dev

    # precision ----------------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """Matrix precision, ``"auto"`` (bfloat16 autocast on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in _PRECISIONS:
            raise ValueError(f"settings.precision must be one of {_PRECISIONS}, got {value!r}.")
        self._precision = value

    def resolve_dtype(self, device: torch.device, precision: str | None = None) -> torch.dtype:
        """The autocast dtype for ``device`` (float32 means no autocast)."""
        import torch

        precision = self._precision if precision is None else precision
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}.")
        if precision == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, precision)

    # batch size and workers -----------------------------------------------------------------------
    @property
    def batch_size(self) -> int | str:
        """Cells per forward pass, ``"auto"`` (sized to the device and model) or a positive integer."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int | str) -> None:
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"settings.batch_size must be 'auto' or a positive integer, got {value!r}.")
        self._batch_size = value

    @property
    def num_workers(self) -> int:
        """Data-loading worker processes (0 = load in the main process)."""
        return self._num_workers

    @num_workers.setter
    def num_workers(self, value: int) -> None:
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"settings.num_workers must be a non-negative integer, got {value!r}.")
        self._num_workers = value

    # CPU threads and kernels ------------------------------------------------------------------------
    @property
    def n_threads(self) -> int | str:
        """CPU threads of training and inference, ``"auto"`` (default) or a positive integer.

        ``"auto"`` uses one thread per physical core this process may run on (its CPU affinity and any
        container CPU quota; ``OMP_NUM_THREADS``, when set, caps it), and a single thread when OpenMP
        threads spin while waiting (torch imported before scbert_tl without ``OMP_WAIT_POLICY=PASSIVE``)
        and other processes keep the cores busy. The count is set for the duration of each run and
        restored afterwards; the chosen count is logged. Results can differ in the last bits between
        thread counts: set a number for runs that must agree bit for bit across machines.
        """
        return self._n_threads

    @n_threads.setter
    def n_threads(self, value: int | str) -> None:
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"settings.n_threads must be 'auto' or a positive integer, got {value!r}.")
        self._n_threads = value

    @property
    def onednn(self) -> bool:
        """Whether float32 CPU products may use oneDNN with packed weights (on by default; ``SCBERT_ONEDNN=0`` turns it off).

        It is still only used where it is present and agrees with :func:`torch.nn.functional.linear`.
        """
        return self._onednn

    @onednn.setter
    def onednn(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"settings.onednn must be True or False, got {value!r}.")
        self._onednn = value

    @property
    def compile(self) -> bool:
        """Whether inference runs through ``torch.compile``'d encoder blocks (default: off; ``SCBERT_COMPILE=1`` turns it on)."""
        return self._compile

    @compile.setter
    def compile(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"settings.compile must be True or False, got {value!r}.")
        self._compile = value

    # verbosity ----------------------------------------------------------------------------------
    @property
    def verbosity(self) -> int:
        """0 errors, 1 warnings, 2 info (default), 3 debug. Progress bars show at 2 and above.

        Messages go to ``sys.stderr`` (the notebook's or the shell's), or only to your own handlers
        when you configured logging (e.g. ``logging.basicConfig``), never to both.
        """
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int) -> None:
        if value not in _LEVELS:
            raise ValueError(f"settings.verbosity must be one of {sorted(_LEVELS)}, got {value!r}.")
        self._verbosity = value
        logging.getLogger("scbert_tl").setLevel(_LEVELS[value])

    @property
    def progress(self) -> bool:
        """Whether progress bars are shown (``verbosity >= 2``)."""
        return self._verbosity >= 2

    # cache --------------------------------------------------------------------------------------
    @property
    def cachedir(self) -> Path:
        """Where downloaded assets are cached (``SCBERT_DATA_DIR`` if set, else the OS cache folder)."""
        if self._cachedir is not None:
            return self._cachedir
        env = os.environ.get("SCBERT_DATA_DIR")
        if env:
            return Path(env).expanduser()
        import pooch

        return Path(pooch.os_cache("scbert-tl"))

    @cachedir.setter
    def cachedir(self, value: str | os.PathLike | None) -> None:
        self._cachedir = None if value is None else Path(value).expanduser()

    @property
    def hgnc_path(self) -> Path | None:
        """A local HGNC complete-set table for gene alignment (``None``: the registry's copy, fetched once per process).

        For machines without internet: download ``hgnc_complete_set.txt`` from genenames.org elsewhere and
        point this at it (or put it in the :attr:`~scbert_tl._settings.ScBERTSettings.cachedir` as
        ``hgnc-complete-set``). Used by :func:`scbert_tl.pp.bin` with ``aliases="hgnc"``.
        """
        return self._hgnc_path

    @hgnc_path.setter
    def hgnc_path(self, value: str | os.PathLike | None) -> None:
        if value is not None and not Path(value).expanduser().is_file():
            raise FileNotFoundError(f"settings.hgnc_path: {value} is not a file (expected hgnc_complete_set.txt).")
        self._hgnc_path = None if value is None else Path(value).expanduser()

    def __repr__(self) -> str:
        fields = (
            "device", "precision", "batch_size", "num_workers", "n_threads", "onednn", "compile", "verbosity", "cachedir",
            "hgnc_path",
        )  # fmt: skip
        return "ScBERTSettings(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in fields) + ")"


settings = ScBERTSettings()
