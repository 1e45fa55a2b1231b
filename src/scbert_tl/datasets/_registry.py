"""One pooch registry for every downloaded asset, with integrity checks."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import pooch

from .._logging import quieted
from .._settings import settings

if TYPE_CHECKING:
    import os

logger = logging.getLogger(__name__)


class IntegrityError(OSError):
    """A downloaded or cached file does not match its published checksum."""


@dataclass(frozen=True)
class Asset:
    r"""A downloadable file and how to verify it.

    Parameters
    ----------
    name
        Registry name; also the cached file name.
    url
        Where to download it from.
    sha256
        SHA-256 of the file, where published.
    git_sha1
        Git blob SHA-1 (``sha1(b"blob <size>\\0" + content)``), where only that is published.
    pin
        For a file whose publisher gives no checksum (a dated, immutable release): its SHA-256 is
        recorded beside the cached copy at the first download and every later use is checked
        against it, so a truncated or altered cache is refused. A readable format check of the
        content (the asset's reader) guards the first download.
    description
        One line for humans.
    license
        Terms of the asset.
    """

    name: str
    url: str
    sha256: str | None = None
    git_sha1: str | None = None
    pin: bool = False
    description: str = ""
    license: str = ""

    def __post_init__(self) -> None:
        if not (self.sha256 or self.git_sha1 or self.pin):
            raise ValueError(
                f"Asset {self.name!r} needs a sha256 or a git_sha1 (or pin=True for a dated release without a "
                "published checksum): downloads are always verified."
            )


def _load_registry() -> dict[str, Asset]:
    raw = json.loads(files(__package__).joinpath("registry.json").read_text())
    return {name: Asset(name=name, **entry) for name, entry in raw.items()}


REGISTRY: dict[str, Asset] = _load_registry()


def available() -> list[str]:
    """Names of the assets in the registry."""
    return sorted(REGISTRY)


def git_blob_sha1(path: str | os.PathLike) -> str:
    """The git blob SHA-1 of a file (what ``git hash-object`` prints)."""
    path = Path(path)
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file (hex)."""
    path = Path(path)
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_pin(asset: Asset, path: Path) -> None:
    """Record the SHA-256 of a pinned asset at its first download; check it on every later use."""
    pin_file = path.with_name(path.name + ".sha256")
    got = file_sha256(path)
    if not pin_file.exists():
        pin_file.write_text(got + "\n")
        logger.info("%s has no published checksum; pinned its sha256 %s at first download", asset.name, got)
    elif pin_file.read_text().strip() != got:
        path.unlink(missing_ok=True)
        pin_file.unlink(missing_ok=True)
        raise IntegrityError(
            f"{asset.name}: the cached copy no longer matches the sha256 pinned at its first download. "
            "The corrupt copy was deleted from the cache; fetch it again."
        )


def fetch(asset: str | Asset, *, progressbar: bool | None = None) -> Path:
    """Download (once) and verify an asset; return the path of the cached file.

    The file lives in :attr:`scbert.settings.cachedir <scbert_tl._settings.ScBERTSettings.cachedir>`
    (``SCBERT_DATA_DIR`` overrides it). A file that fails its checksum, freshly downloaded or found in
    the cache, is deleted and an :class:`IntegrityError` is raised; it is never used.

    Parameters
    ----------
    asset
        A registry name (see :func:`available`) or an :class:`Asset`.
    progressbar
        Show a download progress bar (default: when ``settings.verbosity >= 2``).

    Returns
    -------
    Path of the verified local file.
    """
    if isinstance(asset, str):
        if asset not in REGISTRY:
            raise KeyError(f"Unknown asset {asset!r}; the registry has {available()}.")
        asset = REGISTRY[asset]
    cache = settings.cachedir
    cache.mkdir(parents=True, exist_ok=True)
    progressbar = settings.progress if progressbar is None else progressbar
    known_hash = f"sha256:{asset.sha256}" if asset.sha256 else None
    target = cache / asset.name
    if not target.exists():
        logger.info("Downloading %s from %s", asset.name, asset.url)
    try:
        # pooch's own "Downloading data from ..." line would repeat ours, or precede a failure
        with quieted(pooch.get_logger()):
            path = Path(
                pooch.retrieve(asset.url, known_hash=known_hash, fname=asset.name, path=cache, progressbar=progressbar)
            )
    except ValueError as e:  # pooch's hash mismatch: it has already discarded the download
        target.unlink(missing_ok=True)
        raise IntegrityError(f"{asset.name}: the download from {asset.url} does not match its sha256; {e}") from e
    except OSError as e:  # no network, proxy, HTTP error
        raise OSError(
            f"Could not download {asset.name} from {asset.url} ({type(e).__name__}). On a machine without "
            f"internet access, download it elsewhere and put it at {target} (set SCBERT_DATA_DIR to choose the "
            "folder); it is verified before use."
        ) from e
    if asset.pin and not (asset.sha256 or asset.git_sha1):
        _check_pin(asset, path)
    if asset.git_sha1:
        got = git_blob_sha1(path)
        if got != asset.git_sha1:
            path.unlink(missing_ok=True)
            raise IntegrityError(
                f"{asset.name}: file from {asset.url} has git blob SHA-1 {got}, expected {asset.git_sha1}. "
                "The corrupt copy was deleted from the cache; try again, or check your network/proxy."
            )
    return path
