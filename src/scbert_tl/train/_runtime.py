"""The CPU side of every training and inference run: threads, subnormal floats, large buffers.

Three things decide how fast the same network runs on a CPU, more than any kernel:

* **Threads that wait.** OpenMP threads meet at a barrier after every parallel operation. By default
  they spin there, burning the core they hold; when another process needs that core, the thread the
  barrier waits for is descheduled for a whole scheduler slice, every time. On 2 cores with one other
  busy process this made a training step 10-20 times slower. ``import scbert_tl`` before ``torch``
  sets ``OMP_WAIT_POLICY=PASSIVE`` (unless it is set already), so waiting threads sleep instead.
* **How many threads.** :attr:`~scbert_tl._settings.ScBERTSettings.n_threads` (``"auto"``: one per
  physical core this process may use; see :func:`auto_threads`).
* **Large buffers.** glibc serves every allocation above 32 MiB with a fresh ``mmap``, so each large
  activation is faulted in page by page and zeroed by the kernel, on every step (about a third of a
  compact training step in a virtual machine). During a run, allocations up to 1 GiB are served from
  the heap and reused; at the end the thresholds go back to glibc's own limits and free memory is
  returned to the system (``malloc_trim``).

Subnormal floats are flushed to zero during a run as well (:func:`cpu_runtime`): FAVOR+ features are
exponentials, some underflow into subnormal numbers as weights grow, and x86 CPUs process those many
times slower than normal ones (flushing changes values by less than 1e-38).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .._settings import settings

if TYPE_CHECKING:
    from collections.abc import Iterator

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Served from the heap (and reused) during a run: allocations up to this size.
RUN_MMAP_THRESHOLD = 1 << 30
#: glibc's own limits, restored after a run: its dynamic mmap threshold stops rising at 32 MiB (64-bit).
GLIBC_MMAP_THRESHOLD = 32 << 20


def omp_passive() -> bool:
    """Whether torch's OpenMP threads sleep rather than spin while they wait (``OMP_WAIT_POLICY=PASSIVE``)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def _cpu_quota() -> float | None:
    """CPUs allowed by a cgroup quota (containers), if any."""
    for path, parse in (
        ("/sys/fs/cgroup/cpu.max", lambda t: t.split()),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", lambda t: [t.strip(), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")]),
    ):
        text = _read(path)
        if text is None:
            continue
        with contextlib.suppress(ValueError, TypeError, IndexError):
            quota, period = parse(text)[:2]
            if quota not in ("max", "-1") and float(period) > 0:
                return float(quota) / float(period)
    return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


@functools.cache
def available_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, one per core (not per hardware thread), a cgroup quota."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return max(1, torch.get_num_threads())
    cores = set()
    for cpu in cpus:
        siblings = _read(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        cores.add(siblings.strip() if siblings else str(cpu))
    n = len(cores) or len(cpus)
    quota = _cpu_quota()
    if quota is not None:
        n = min(n, max(1, int(quota + 0.5)))
    return max(1, n)


def _other_runnable() -> int:
    """Runnable threads on the machine outside this process, now (``/proc/loadavg`` less this process's own)."""
    text = _read("/proc/loadavg")
    try:
        running = int(text.split()[3].split("/")[0])
    except (AttributeError, IndexError, ValueError):
        return 0
    own = 0
    with contextlib.suppress(OSError):
        for task in Path("/proc/self/task").iterdir():
            stat = _read(str(task / "stat")) or ""
            own += stat.rpartition(")")[2].split()[:1] == ["R"]
    return max(0, running - max(own, 1))


def auto_threads() -> int:
    """The thread count of ``settings.n_threads="auto"``.

    One thread per physical core this process may use (:func:`available_cores`), shared among the
    processes of a distributed run on this machine (``LOCAL_WORLD_SIZE``), at most ``OMP_NUM_THREADS``
    when that is set. When OpenMP threads spin while waiting (torch was loaded before scbert_tl and
    ``OMP_WAIT_POLICY`` is not ``PASSIVE``) and other processes were running when this was first asked,
    a second thread costs far more than it brings, so one thread is used for the rest of the process
    (decided once, so that runs in one process keep one thread count and give the same results).
    """
    n = available_cores()
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    if local.isdigit() and int(local) > 1:
        n = max(1, n // int(local))
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    if n > 1 and _spinning_on_a_busy_machine():
        return 1
    return n


@functools.cache
def _spinning_on_a_busy_machine() -> bool:
    if omp_passive() or _other_runnable() == 0:
        return False
    logger.info(
        "Other processes are running and torch's OpenMP threads spin while they wait (torch was imported "
        "before scbert_tl): using one thread. Start Python with OMP_WAIT_POLICY=PASSIVE, or import scbert_tl "
        "before torch, to use every core without slowing down on a busy machine."
    )
    return True


def resolve_threads(n_threads: int | str | None = None) -> int:
    """``n_threads`` (default: the setting) as a count; ``"auto"`` as :func:`auto_threads` says."""
    n_threads = settings.n_threads if n_threads is None else n_threads
    return auto_threads() if n_threads == "auto" else int(n_threads)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt(mmap_threshold: int) -> None:
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold)


def release_free_memory() -> None:
    """Give the memory freed on the heap back to the system (``malloc_trim``; glibc only).

    During a run large buffers are served from the heap and reused (:func:`cpu_runtime`); buffers of
    changing sizes (chunks of a streamed run) leave free gaps there that the resident set keeps.
    Streamed runs call this after each chunk, so that their memory stays that of one chunk.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_depth = 0


@contextlib.contextmanager
def cpu_runtime(device: torch.device | str, *, desc: str = "run") -> Iterator[int]:
    """Threads, flushed subnormals and reused large buffers for a run on ``device``; restored afterwards.

    Yields the thread count. On CUDA only the threads are set (they still feed the device). Nested
    runs (validation inside fine-tuning) keep the outer run's state.
    """
    global _depth
    if _depth:
        _depth += 1
        try:
            yield torch.get_num_threads()
        finally:
            _depth -= 1
        return
    cpu = torch.device(device).type == "cpu"
    previous = torch.get_num_threads()
    threads = resolve_threads()
    logger.info("%s: %d CPU thread%s (settings.n_threads=%r)", desc, threads, "s"[: threads > 1], settings.n_threads)
    torch.set_num_threads(threads)
    flushing = cpu and torch.set_flush_denormal(True)  # returns whether flushing is supported
    if cpu:
        _mallopt(RUN_MMAP_THRESHOLD)
    _depth = 1
    try:
        yield threads
    finally:
        _depth = 0
        if flushing:
            torch.set_flush_denormal(False)
        if cpu and _glibc() is not None:
            _mallopt(GLIBC_MMAP_THRESHOLD)
            _glibc().malloc_trim(0)
        torch.set_num_threads(previous)
