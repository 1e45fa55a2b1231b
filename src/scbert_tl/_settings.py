"""Package-wide settings: device, precision, batch size, threads, kernels, verbosity, cache directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch  # imported when first needed, so that `import scbert_tl` and `scbert --help` stay light

_PRECISIONS = ("auto", "float32", "bfloat16", "float16")
_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}


def _env_flag(name: str, *, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "no", "off")


def _auto_or_positive(value: object) -> bool:
    return value == "auto" or (isinstance(value, int) and value >= 1)


class _Checked:
    """A setting checked on assignment, kept in the instance's ``_<name>``.

    ``ok(value)`` false raises ``ValueError("settings.<name> must be <expected>, got <value>.")``.
    """

    def __init__(self, ok: Callable[[Any], bool], expected: str, doc: str) -> None:
        self.ok, self.expected, self.__doc__ = ok, expected, doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, settings: object, owner: type | None = None) -> Any:
        return self if settings is None else getattr(settings, f"_{self.name}")

    def __set__(self, settings: object, value: Any) -> None:
        if not self.ok(value):
            raise ValueError(f"settings.{self.name} must be {self.expected}, got {value!r}.")
        setattr(settings, f"_{self.name}", value)


class ScBERTSettings:
    """Settings for :mod:`scbert_tl`, available as ``scbert.settings``.

    Attributes are validated on assignment, so a typo fails at once rather than deep inside a run.
    """

    def __init__(self) -> None:
        self._device = "auto"
        self._precision = "auto"
        self._batch_size: int | str = "auto"
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
    precision = _Checked(
        lambda value: value in _PRECISIONS,
        f"one of {_PRECISIONS}",
        """Matrix precision, ``"auto"`` (bfloat16 autocast on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.""",
    )

    def resolve_dtype(self, device: torch.device, precision: str | None = None) -> torch.dtype:
        """The autocast dtype for ``device`` (float32 means no autocast)."""
        import torch

        precision = self._precision if precision is None else precision
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}.")
        if precision == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, precision)

    batch_size = _Checked(
        _auto_or_positive,
        "'auto' or a positive integer",
        """Cells per forward pass, ``"auto"`` (sized to the device and model) or a positive integer.""",
    )

    # CPU threads and kernels ------------------------------------------------------------------------
    n_threads = _Checked(
        lambda value: _auto_or_positive(value) and not isinstance(value, bool),
        "'auto' or a positive integer",
        """CPU threads of training and inference, ``"auto"`` (default) or a positive integer.

        ``"auto"`` uses one thread per physical core this process may run on (its CPU affinity and any
        container CPU quota; ``OMP_NUM_THREADS``, when set, caps it), and a single thread when OpenMP
        threads spin while waiting (torch imported before scbert_tl without ``OMP_WAIT_POLICY=PASSIVE``)
        and other processes keep the cores busy. The count is set for the duration of each run and
        restored afterwards; the chosen count is logged. Results can differ in the last bits between
        thread counts: set a number for runs that must agree bit for bit across machines.
        """,
    )
    onednn = _Checked(
        lambda value: isinstance(value, bool),
        "True or False",
        """Whether float32 CPU products may use oneDNN with packed weights (on by default; ``SCBERT_ONEDNN=0`` turns it off).

        It is still only used where it is present and agrees with :func:`torch.nn.functional.linear`.
        """,
    )
    compile = _Checked(
        lambda value: isinstance(value, bool),
        "True or False",
        """Whether inference runs through ``torch.compile``'d encoder blocks (off by default; ``SCBERT_COMPILE=1`` turns it on).""",
    )

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
        """A local HGNC complete-set table for gene alignment (``None`` for the registry's copy, fetched once per process).

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
            "device", "precision", "batch_size", "n_threads", "onednn", "compile", "verbosity", "cachedir",
            "hgnc_path",
        )  # fmt: skip
        return "ScBERTSettings(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in fields) + ")"


settings = ScBERTSettings()
