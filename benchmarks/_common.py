"""What the CPU benchmarks share: the machine's description, and one competing CPU-bound process."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

#: CPU flags that decide which kernels run (oneDNN's float32 and bf16 paths, MKL's path on AMD).
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> dict:
    """CPU model, family, cores, flags, torch and OpenMP settings of this machine (as a process importing scbert_tl sees them)."""
    import scbert_tl  # noqa: F401, I001  (before torch: its OpenMP default applies here as in the workers)
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name":
            info["cpu"] = value
        elif key == "cpu family":
            info["cpu_family"] = int(value)
        elif key == "model":
            info["cpu_model"] = int(value)
        elif key == "flags":
            flags = set(value.split())
            info["flags"] = {f: f in flags for f in FLAGS}
            break
    with contextlib.suppress(Exception):
        from scbert_tl.model._favor import onednn_available
        from scbert_tl.train._runtime import auto_threads, omp_passive

        info["onednn"] = onednn_available()
        info["auto_threads"] = auto_threads()
        info["omp_passive"] = omp_passive()
    return info


def describe(info: dict) -> str:
    """One line naming the CPU and its flags."""
    flags = " ".join(f for f, on in info.get("flags", {}).items() if on) or "none of " + " ".join(FLAGS)
    family = f" (family {info['cpu_family']}, model {info['cpu_model']})" if "cpu_family" in info else ""
    return f"{info['cpu']}{family}, {info['cpu_count']} CPUs, flags: {flags}; torch {info['torch']}"


@contextlib.contextmanager
def competing_process(enabled: bool = True):
    """One CPU-bound Python process (a busy loop) running beside the ``with`` block, stopped after it."""
    if not enabled:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # let it start spinning before the measurement begins
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait()
