"""The CPU runtime of training and inference: thread settings, kernel switches, what a run sets and restores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scbert_tl as scbert
from scbert_tl._settings import ScBERTSettings
from scbert_tl.model import _favor
from scbert_tl.train import _runtime
from scbert_tl.train._runtime import auto_threads, available_cores, cpu_runtime, resolve_threads

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def threads_setting():
    old = scbert.settings.n_threads
    yield
    scbert.settings.n_threads = old


@pytest.fixture
def passive(monkeypatch):
    """As if torch's OpenMP threads sleep while waiting (the decision of a spinning runtime is cached per process)."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    _runtime._spinning_on_a_busy_machine.cache_clear()
    yield
    _runtime._spinning_on_a_busy_machine.cache_clear()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True, None])
def test_n_threads_rejects_nonsense(bad, threads_setting):
    with pytest.raises(ValueError, match="n_threads"):
        scbert.settings.n_threads = bad


@pytest.mark.parametrize(("name", "bad"), [("onednn", 1), ("compile", "yes")])
def test_kernel_switches_must_be_booleans(name, bad):
    with pytest.raises(ValueError, match=name):
        setattr(ScBERTSettings(), name, bad)


@pytest.mark.parametrize(
    ("env", "onednn", "compiled"),
    [
        ({}, True, False),
        ({"SCBERT_ONEDNN": "0", "SCBERT_COMPILE": "1"}, False, True),
        ({"SCBERT_ONEDNN": "off"}, False, False),
    ],
)
def test_kernel_switches_default_to_the_environment(monkeypatch, env, onednn, compiled):
    for key in ("SCBERT_ONEDNN", "SCBERT_COMPILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = ScBERTSettings()
    assert (s.onednn, s.compile) == (onednn, compiled)
    assert "n_threads='auto'" in repr(s)


def test_onednn_setting_turns_the_onednn_path_off(monkeypatch):
    monkeypatch.setattr(scbert.settings, "_onednn", False)
    assert not _favor.onednn_available()


def test_auto_threads_follow_cores_and_caps(passive, monkeypatch):
    cores = available_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert auto_threads() == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert auto_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))
    assert auto_threads() == 1


def test_auto_threads_use_one_thread_when_spinning_threads_meet_other_work(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_runtime, "available_cores", lambda: 4)
    for others, expected in ((3, 1), (0, 4)):
        monkeypatch.setattr(_runtime, "_other_runnable", lambda others=others: others)
        _runtime._spinning_on_a_busy_machine.cache_clear()
        assert auto_threads() == expected
    # decided once per process: later load does not change it
    monkeypatch.setattr(_runtime, "_other_runnable", lambda: 3)
    assert auto_threads() == 4
    _runtime._spinning_on_a_busy_machine.cache_clear()


def test_cpu_runtime_sets_and_restores_threads_and_flushing(passive, threads_setting):
    before = torch.get_num_threads()
    scbert.settings.n_threads = 1 if before > 1 else 2
    with cpu_runtime("cpu") as threads:
        assert threads == torch.get_num_threads() == scbert.settings.n_threads
        tiny = torch.tensor([1e-40], dtype=torch.float32)
        if torch.set_flush_denormal(True):  # supported on this CPU: subnormals read as zero inside a run
            assert (tiny * 1.0).item() == 0.0
        with cpu_runtime("cpu") as inner:  # nested (validation inside fine-tuning): the outer run's state
            assert inner == threads
        assert torch.get_num_threads() == threads
    assert torch.get_num_threads() == before
    assert (torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() != 0.0


def test_resolve_threads_takes_a_number_as_it_is(threads_setting):
    scbert.settings.n_threads = 3
    assert resolve_threads() == 3
    assert resolve_threads(1) == 1


@pytest.mark.parametrize(("torch_first", "expected"), [(False, "PASSIVE"), (True, "unset")])
def test_import_makes_waiting_threads_sleep_unless_torch_came_first(torch_first, expected):
    code = (
        "import torch; " if torch_first else ""
    ) + "import os, scbert_tl; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected


def test_import_is_light_and_the_policy_is_set_before_torch_loads():
    """``import scbert_tl`` loads no torch (the subpackages load on first use), and by then the policy is set."""
    code = (
        "import os, sys, scbert_tl\n"
        "light = 'torch' not in sys.modules\n"
        "scbert_tl.tl.finetune, scbert_tl.ScBERT\n"
        "print(light, 'torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True True PASSIVE"
