"""The package's log messages reach the user by default, as scanpy's do, without doubling anyone's handlers.

The ``scbert_tl`` logger gets one handler that writes to the *current* ``sys.stderr`` (a notebook's
or the shell's). Its level follows :attr:`scbert.settings.verbosity
<scbert_tl._settings.ScBERTSettings.verbosity>`. Records still propagate as usual, so a handler the
user (or pytest's ``caplog``) put on the root logger or on a ``scbert_tl`` logger receives them;
where such a handler exists, the default one stays silent, so no line is printed twice.
``logging.basicConfig`` is never called.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = "scbert_tl"


class _Formatter(logging.Formatter):
    """Info lines as they are; other levels prefixed with the level name (``WARNING: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname}: {text}"


class DefaultHandler(logging.Handler):
    """Writes to ``sys.stderr`` as it is at the time of the record, unless another handler already receives it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_Formatter())

    def _handled_elsewhere(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            for h in logger.handlers:
                if h is not self and not isinstance(h, logging.NullHandler) and record.levelno >= h.level:
                    return True
            logger = logger.parent if logger.propagate else None
        return False

    def emit(self, record: logging.LogRecord) -> None:
        if self._handled_elsewhere(record):
            return
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise; the logging module reports it
            self.handleError(record)


def install() -> None:
    """Give the package logger its default handler (once)."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, DefaultHandler) for h in logger.handlers):
        logger.addHandler(DefaultHandler())


@contextlib.contextmanager
def quieted(logger: logging.Logger, below: int = logging.WARNING) -> Iterator[None]:
    """Hide ``logger``'s lines below ``below`` (by default its info lines; warnings and errors pass) inside the ``with`` block."""
    level = logger.level
    logger.setLevel(below)
    try:
        yield
    finally:
        logger.setLevel(level)
