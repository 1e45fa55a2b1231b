"""Pretraining: masking, streamed data, resuming, DDP under torchrun, the tool and its command line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scbert_tl as scbert
from scbert_tl import ScBERT
from scbert_tl.data import H5adSource, MemorySource, panel_checksum
from scbert_tl.tl._resolve import COMPACT
from scbert_tl.train import StreamPlan, _step, load_checkpoint, mask_tokens, mode_baseline, pretrain_network

N_GENES = 40
GENES = [f"GENE{i}" for i in range(N_GENES)]
TINY = {"depth": 1, "dim": 16, "heads": 2, "dim_head": 8, "gene_emb_trainable": True}


pytestmark = pytest.mark.usefixtures("one_thread")


def _counts(n_cells: int, genes: list[str], seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    lam = rng.gamma(0.6, 3.0, size=len(genes))
    X = rng.poisson(lam, size=(n_cells, len(genes))).astype(np.float32)
    X[:, 0] += 1  # no empty cells
    return ad.AnnData(
        sp.csr_matrix(X),
        var=pd.DataFrame(index=genes),
        obs=pd.DataFrame(index=[f"c{seed}_{i}" for i in range(n_cells)]),
    )


def _binned(n_cells: int, genes: list[str], seed: int, panel: list[str] = GENES) -> ad.AnnData:
    a = _counts(n_cells, genes, seed)
    scbert.pp.bin(a, panel=panel, aliases=None)
    return a


def _tiny_model(seed: int = 0) -> ScBERT:
    return ScBERT.new(GENES, seed=seed, **TINY)


def _panel_rows(a: ad.AnnData) -> np.ndarray:
    """The tokens of ``a`` in panel order, densely (the reference the streams are checked against)."""
    out = np.zeros((a.n_obs, N_GENES), dtype=np.int8)
    idx = a.var["scbert_panel_index"].to_numpy()
    keep = idx >= 0
    out[:, idx[keep]] = a.layers["scbert_bins"].toarray()[:, keep]
    return out


@pytest.fixture
def files(tmp_path):
    """Three small binned files; the second has its genes in another order and two genes outside the panel."""
    genes_b = [*GENES[::-1][:30], "NOTAGENE1", "NOTAGENE2"]
    adatas = [_binned(37, GENES, 1), _binned(50, genes_b, 2), _binned(23, GENES[:25], 3)]
    paths = []
    for i, a in enumerate(adatas):
        paths.append(tmp_path / f"part{i}.h5ad")
        a.write_h5ad(paths[-1])
    return paths, adatas


# ---------------------------------------------------------------------------------------------- 1. masking
def test_masking_statistics_and_determinism():
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 6, size=(400, 500)).astype(np.int8)
    dense[dense < 3] = 0
    tokens = sp.csr_matrix(dense)
    tokens.data[::50] = 0  # explicit stored zeros are not candidates either
    masked, chosen = mask_tokens(tokens, np.random.default_rng(1), mask_token=6)

    nonzero = tokens.data != 0
    assert not chosen[~nonzero].any()  # only non-zero tokens are candidates
    n = nonzero.sum()
    p = chosen.sum() / n
    assert abs(p - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n)
    became_mask = masked.data == 6
    assert not became_mask[~chosen].any()
    assert (masked.data[~chosen] == tokens.data[~chosen]).all()  # unchosen tokens untouched
    q = became_mask[chosen].mean()
    assert abs(q - 0.9) < 4 * np.sqrt(0.09 / chosen.sum())  # 90% [MASK], 10% stay as they are
    assert (masked.data[chosen & ~became_mask] == tokens.data[chosen & ~became_mask]).all()
    # zero positions stay zero (same sparsity pattern)
    assert np.array_equal(masked.indices, tokens.indices) and np.array_equal(masked.indptr, tokens.indptr)

    again, chosen2 = mask_tokens(tokens, np.random.default_rng(1), mask_token=6)
    assert np.array_equal(chosen, chosen2) and np.array_equal(again.data, masked.data)
    _, other = mask_tokens(tokens, np.random.default_rng(2), mask_token=6)
    assert not np.array_equal(chosen, other)


def test_masking_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(sp.csr_matrix(np.ones((1, 3), np.int8)), np.random.default_rng(0), mask_token=6, mask_prob=0)


def test_mode_baseline():
    x = torch.tensor([[1, 1, 2, 6, 0, 3], [0, 0, 6, 6, 0, 0], [2, 2, 3, 3, 0, 0]])
    pred, logp = mode_baseline(x, n_bins=5, mask_token=6)
    assert pred.tolist() == [1, 1, 2]  # [MASK] and 0 are not counted; ties go to the lower bin; nothing visible -> 1
    assert torch.allclose(logp[0, 1:].exp().sum(), torch.tensor(1.0, dtype=logp.dtype))
    assert logp[0, 1].exp().item() == pytest.approx(3 / 9)  # (2 + 1) / (4 visible + 5 bins)


def test_accumulation_equals_one_big_batch():
    """With every non-zero token masked (no randomness), 2 x 8 accumulated cells give the step of 16 cells at once."""
    a = _binned(40, GENES, 5)
    src = [MemorySource(a.layers["scbert_bins"], a.var["scbert_panel_index"].to_numpy(), N_GENES)]
    kw = {
        "max_steps": 1,
        "lr": 1e-2,
        "warmup": 0,
        "mask_prob": 1.0,
        "replace_prob": 1.0,
        "validation_size": 0,
        "chunk_size": 64,
    }
    one, two = _tiny_model().network, _tiny_model().network
    pretrain_network(one, src, batch_size=16, **kw)
    pretrain_network(two, src, batch_size=8, accumulate=2, **kw)
    init = _tiny_model().network.state_dict()
    for k, v in one.state_dict().items():
        assert torch.allclose(v, two.state_dict()[k], atol=1e-6), k
    assert not torch.equal(one.state_dict()["lm_head.weight"], init["lm_head.weight"])


# ---------------------------------------------------------------------------------------------- 4. streaming
def test_stream_from_files_is_bounded_and_covers_each_training_cell_once(files, monkeypatch):
    paths, adatas = files
    sources = [
        H5adSource(p, a.var["scbert_panel_index"].to_numpy(), N_GENES) for p, a in zip(paths, adatas, strict=True)
    ]
    reads = []
    orig = H5adSource.read

    def spy(self, start, stop):
        reads.append(stop - start)
        return orig(self, start, stop)

    monkeypatch.setattr(H5adSource, "read", spy)
    plan = StreamPlan(sources, chunk_size=8, shuffle_buffer=2, validation_size=10, seed=0)
    reference = np.concatenate([_panel_rows(a) for a in adatas])
    n = reference.shape[0]
    val = set(plan.validation.tolist())
    assert len(val) == 10
    orders = []
    for epoch in range(2):
        seen = []
        for ids, tokens in plan.iter_batches(epoch, batch_size=6):
            assert tokens.shape[0] == ids.size <= 6 and tokens.dtype == np.int8
            assert np.array_equal(tokens.toarray(), reference[ids])  # genes land in panel order, per file
            seen.extend(ids.tolist())
        assert sorted(seen) == sorted(set(range(n)) - val)  # every training cell exactly once
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled every epoch
    assert max(reads) <= 8  # bounded reads
    blocks = plan.epoch_blocks(0)
    assert max(plan.chunk_train[b].sum() for b in blocks) <= 16  # at most shuffle_buffer chunks in memory
    # the same plan seeded the same way streams the same order; resuming mid-epoch continues it exactly
    again = StreamPlan(sources, chunk_size=8, shuffle_buffer=2, validation_size=10, seed=0)
    tail = [i for ids, _ in again.iter_batches(0, 6, start=5) for i in ids.tolist()]
    assert tail == orders[0][30:]
    plan.close()

    # two processes: disjoint shards that together hold every training cell
    shards = [
        StreamPlan(sources, chunk_size=8, shuffle_buffer=2, validation_size=10, seed=0, rank=r, world_size=2)
        for r in range(2)
    ]
    per_rank = [{i for ids, _ in s.iter_batches(0, 6) for i in ids.tolist()} for s in shards]
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(range(n)) - val
    assert shards[0].batches_per_epoch(6) == shards[1].batches_per_epoch(6)


def test_held_out_cells_are_never_trained_on(monkeypatch):
    a = _binned(60, GENES, 7)
    trained = []
    orig = StreamPlan.iter_batches

    def spy(self, *args, **kwargs):
        for ids, tokens in orig(self, *args, **kwargs):
            trained.extend(ids.tolist())
            yield ids, tokens

    monkeypatch.setattr(StreamPlan, "iter_batches", spy)
    model = scbert.tl.pretrain(
        a, model=_tiny_model(), epochs=2, batch_size=8, validation_size=12, chunk_size=16, random_state=3
    )
    plan = StreamPlan(
        [MemorySource(a.layers["scbert_bins"], a.var["scbert_panel_index"].to_numpy(), N_GENES)],
        chunk_size=16,
        validation_size=12,
        seed=3,
    )
    assert len(trained) == 2 * 48
    assert not set(trained) & set(plan.validation.tolist())
    h = model.history[-1]
    assert h["val_cells"] == 12 and 0 <= h["val_accuracy"] <= 1 and 0 <= h["baseline_accuracy"] <= 1
    assert h["stage"] == "pretrain" and h["step"] == 2 * 6 and h["epoch"] == pytest.approx(2.0)
    assert model.provenance["pretraining"][-1]["final"]["val_accuracy"] == h["val_accuracy"]


def test_pretrain_on_files_including_one_binned_on_the_fly(files, tmp_path):
    paths, adatas = files
    raw = _counts(30, GENES, 9)  # never binned: its chunks are binned as they are read
    raw.write_h5ad(tmp_path / "raw.h5ad")
    model = _tiny_model()
    backed = ad.read_h5ad(paths[0], backed="r")  # streamed from its file
    inputs = [backed, *paths[1:], tmp_path / "raw.h5ad"]
    out = scbert.tl.pretrain(inputs, model=model, max_steps=3, batch_size=8, chunk_size=16)
    assert model.history == []  # the caller's model is left alone
    assert out.history[-1]["step"] == 3
    assert [d["name"] for d in out.provenance["pretraining"][0]["params"]["data"]] == [
        "part0.h5ad",
        "part1.h5ad",
        "part2.h5ad",
        "raw.h5ad",
    ]

    from scbert_tl.data import H5adFile
    from scbert_tl.tl._data import source_for

    assert isinstance(source_for(backed, model, "b", main=True), H5adSource)
    with pytest.raises(ValueError, match="view of a backed"):
        source_for(backed[:5], model, "b", main=True)
    src = source_for(tmp_path / "raw.h5ad", model, "raw.h5ad", main=True)
    expected = raw.copy()
    scbert.pp.bin(expected, panel=model, aliases=None)
    assert np.array_equal(src.read(0, 30).toarray(), _panel_rows(expected))
    assert H5adFile(tmp_path / "raw.h5ad").n_obs == 30


def test_continue_a_classifier_without_pretraining_head(tmp_path):
    a = _binned(40, GENES, 8)
    clf = ScBERT.new(GENES, seed=0, lm_head=False, **TINY)
    clf.network.add_classifier(3)
    clf.classes = ["x", "y", "z"]
    clf.save(tmp_path / "clf")
    runs = [scbert.tl.pretrain(a, model=tmp_path / "clf", max_steps=2, batch_size=8, random_state=2) for _ in range(2)]
    before = clf.network.classifier.state_dict()
    for out in runs:
        assert out.network.lm_head is not None and out.config.lm_head and out.classes == ["x", "y", "z"]
        assert all(torch.equal(v, out.network.classifier.state_dict()[k]) for k, v in before.items())  # untouched
        assert all(p.requires_grad for p in out.network.classifier.parameters())  # and not left frozen
    assert torch.equal(runs[0].network.lm_head.weight, runs[1].network.lm_head.weight)  # seeded, not global RNG


# ---------------------------------------------------------------------------------------------- 3. resume
def _run(a, ckpt, **kw):
    args = {
        "model": _tiny_model(),
        "epochs": 3,
        "batch_size": 8,
        "accumulate": 2,
        "validation_size": 10,
        "eval_every": 2,
        "redraw_every": 3,
        "chunk_size": 16,
        "checkpoint_dir": ckpt,
        "checkpoint_every": 2,
        "random_state": 5,
    }
    args.update(kw)
    return scbert.tl.pretrain(a, **args)


def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    a = _binned(90, GENES, 11)
    full = _run(a, tmp_path / "full")
    assert full.history[-1]["step"] == 15  # 80 cells / (8 x 2) = 5 steps per epoch

    calls = {"n": 0}
    orig = _step.train_step

    def dies_at_step_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")
        return orig(*args, **kwargs)

    monkeypatch.setattr(_step, "train_step", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        _run(a, tmp_path / "killed")
    assert load_checkpoint(tmp_path / "killed")["step"] == 6  # the last checkpoint before the kill
    monkeypatch.setattr(_step, "train_step", orig)
    resumed = _run(a, tmp_path / "killed", model=None, resume=True)

    for (k, v), (k2, v2) in zip(full.network.state_dict().items(), resumed.network.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]
    assert [h["step"] for h in resumed.history] == [2, 4, 6, 8, 10, 12, 14, 15]

    # a run stopped on purpose (stop_after) also continues to the same weights
    first = _run(a, tmp_path / "sliced", stop_after=4)
    assert first.provenance["pretraining"][-1]["finished"] is False
    second = _run(a, tmp_path / "sliced", model=None, resume=True, stop_after=11)
    third = _run(a, tmp_path / "sliced", model=None, resume=True)
    assert second.history[-1]["step"] == 10 and third.provenance["pretraining"][-1]["finished"] is True
    for v, v2 in zip(full.network.state_dict().values(), third.network.state_dict().values(), strict=True):
        assert torch.equal(v, v2)


def test_resumed_run_keeps_every_model_field(tmp_path):
    # a model that reads unmeasured genes as [MASK] (and carries a calibration) must come back as such from
    # its checkpoint: rebuilt with the defaults it would silently read them as zero expression
    a = _binned(40, GENES, 13)
    model = _tiny_model()
    model.unmeasured, model.calibration = "mask", {"temperature": 1.5}
    _run(a, tmp_path, model=model, epochs=1, stop_after=2)
    resumed = _run(a, tmp_path, model=None, resume=True, epochs=1)
    assert resumed.unmeasured == "mask"
    assert resumed.calibration == {"temperature": 1.5}
    assert resumed.genes == model.genes and resumed.panel == model.panel


def test_checkpoint_guards(tmp_path):
    a = _binned(40, GENES, 12)
    _run(a, tmp_path, epochs=1)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "step", "epoch", "position", "rng", "params", "history"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary files left
    with pytest.raises(FileExistsError, match="resume=True"):
        _run(a, tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        _run(a, tmp_path, model=None, resume=True, batch_size=4)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        _run(a, None, resume=True)


# ---------------------------------------------------------------------------------------------- 2. torchrun
DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import torch
    import scbert_tl as scbert

    out = Path(sys.argv[1])
    scbert.settings.verbosity = 1
    model = scbert.ScBERT.load(out / "init")
    trained = scbert.tl.pretrain(
        sys.argv[2:], model=model, max_steps=4, batch_size=6, accumulate=2, chunk_size=8, validation_size=8,
        eval_every=2, redraw_every=3, checkpoint_dir=out / "ckpt", checkpoint_every=2, random_state=1, device="cpu",
    )
    torch.save(trained.network.state_dict(), out / f"rank{os.environ['RANK']}.pt")
    """
)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(files, tmp_path):
    paths, _ = files
    _tiny_model().save(tmp_path / "init")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
        *map(str, paths),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    init = ScBERT.load(tmp_path / "init").network.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)  # replicated weights, buffers included
    assert not torch.equal(s0["token_emb.weight"], init["token_emb.weight"])  # and they did train
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint.pt"]  # one writer, one file
    ckpt = scbert.train.load_checkpoint(tmp_path / "ckpt")
    assert ckpt["params"]["world_size"] == 2 and ckpt["step"] == 4
    assert ckpt["history"][-1]["val_cells"] == 8  # both ranks' held-out shares counted
    assert all(torch.equal(ckpt["model"][k], s0[k]) for k in s0)


# ---------------------------------------------------------------------------------------------- 5. bad input
def test_bad_inputs(tmp_path):
    model = _tiny_model()
    with pytest.raises(ValueError, match="empty"):
        scbert.tl.pretrain([], model=model)
    with pytest.raises(FileNotFoundError):
        scbert.tl.pretrain(tmp_path / "missing.h5ad", model=model)
    with pytest.raises(TypeError, match="AnnData"):
        scbert.tl.pretrain(42, model=model)

    empty = _counts(5, GENES, 1)[:0].copy()
    empty.write_h5ad(tmp_path / "empty.h5ad")
    with pytest.raises(ValueError, match="no cells"):
        scbert.tl.pretrain(tmp_path / "empty.h5ad", model=model)
    with pytest.raises(ValueError, match="no cells"):
        scbert.tl.pretrain(empty, model=model)

    other = _counts(20, [f"OTHER{i}" for i in range(30)], 2)
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(ValueError, match="None of the 30 genes"):
        scbert.tl.pretrain(tmp_path / "other.h5ad", model=model)  # no bins layer, and nothing to bin it with

    scaled = _counts(20, GENES, 3)
    scaled.X = sp.csr_matrix(scaled.X.toarray() - 1.0)  # centred data cannot be binned
    scaled.write_h5ad(tmp_path / "scaled.h5ad")
    with pytest.raises(ValueError, match=r"scaled\.h5ad.*negative"):
        scbert.tl.pretrain(tmp_path / "scaled.h5ad", model=model)

    with pytest.raises(ValueError, match="leaves no training cells"):
        scbert.tl.pretrain(_binned(10, GENES, 4), model=model, validation_size=10)
    with pytest.raises(ValueError, match="not a model"):
        scbert.tl.pretrain(_binned(10, GENES, 4), model="no-such-model")


def test_core_rejects_mismatched_panel():
    net = _tiny_model().network
    with pytest.raises(ValueError, match="panel genes"):
        pretrain_network(net, [MemorySource(sp.csr_matrix(np.ones((10, 5), np.int8)))], max_steps=1)


# ---------------------------------------------------------------------------------------------- command line
def test_cli(files, tmp_path, capsys):
    from scbert_tl._cli import build_parser as _parser
    from scbert_tl._cli.pretrain import run as run_pretrain_command

    paths, _ = files
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["pretrain", "--help"])
    assert e.value.code == 0 and "--resume" in capsys.readouterr().out

    _tiny_model().save(tmp_path / "init")
    args = _parser().parse_args(
        [
            "pretrain",
            *map(str, paths),
            "-m",
            str(tmp_path / "init"),
            "-o",
            str(tmp_path / "out"),
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--chunk-size",
            "16",
            "--validation-size",
            "6",
            "--resume",
            "--checkpoint-dir",
            str(tmp_path / "ck"),
        ]
    )
    assert args.resume is True and run_pretrain_command(args) == 0
    assert "held-out masked accuracy" in capsys.readouterr().out
    assert ScBERT.load(tmp_path / "out").history[-1]["step"] == 2
    args = _parser().parse_args(
        ["pretrain", *map(str, paths), "-m", str(tmp_path / "init"), "-o", str(tmp_path / "out")]
    )
    assert run_pretrain_command(args) == 1 and "already exists" in capsys.readouterr().err
    args = _parser().parse_args(["pretrain", str(tmp_path / "nope.h5ad"), "--output", str(tmp_path / "o2")])
    captured = capsys.readouterr().err
    assert "--output is deprecated; use --out" in captured and args.out == str(tmp_path / "o2")
    assert run_pretrain_command(args) == 1 and "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_compact_model_on_pbmc3k(pbmc3k):
    a = pbmc3k[:400].copy()
    model = scbert.tl.pretrain(a, n_genes=300, max_steps=2, batch_size=16, validation_size=32)
    assert (
        len(model.genes) == 300 and model.config.depth == COMPACT["depth"] and model.provenance["source"] == "compact"
    )
    assert "scbert_bins" in a.layers  # binned in place for the model's panel
    assert a.uns["scbert"]["panel_checksum"] == panel_checksum(model.genes)
    assert model.history[-1]["val_masked"] > 0


def test_no_weight_decay_on_norms_biases_and_embeddings():
    from scbert_tl.train._plan import parameter_groups

    net = _tiny_model().network
    decayed, plain = parameter_groups(net, 0.01)
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert decayed["params"] and all(p.ndim == 2 for p in decayed["params"])
    undecayed = {id(p) for p in plain["params"]}
    for p in (net.token_emb.weight, net.gene_emb.weight, net.norm.weight, net.norm.bias):
        assert id(p) in undecayed or not p.requires_grad
    assert len(decayed["params"]) + len(plain["params"]) == sum(p.requires_grad for p in net.parameters())
    assert len(parameter_groups(net, 0.0)) == 1  # nothing to split without decay (old checkpoints resume)


def test_one_warm_up_rule_for_both_loops():
    from scbert_tl.train._plan import warmup_steps

    assert warmup_steps(0.05, 528) == 26 and warmup_steps(0.05, 4) == 1  # a fraction: rounded, at least one step
    assert warmup_steps(0, 100) == 0 and warmup_steps(0.0, 100) == 0 and warmup_steps(7, 100) == 7
    with pytest.raises(ValueError, match="warmup"):
        warmup_steps(-1, 10)


def test_fine_tuning_scales_float16_losses_like_pretraining():
    from scbert_tl.train._finetune import FinetuneOptions, _plan

    net = _tiny_model().network
    cpu = torch.device("cpu")
    assert _plan(net, FinetuneOptions(), 100, cpu, torch.float16).scaler.is_enabled()
    assert not _plan(net, FinetuneOptions(), 100, cpu, torch.bfloat16).scaler.is_enabled()
    assert not _plan(net, FinetuneOptions(), 100, cpu, torch.float32).scaler.is_enabled()


def test_pretrain_signature_matches_its_options():
    """tl.pretrain repeats the options in its signature for the API docs: same names, same defaults."""
    import dataclasses
    import inspect

    from scbert_tl._cli import build_parser
    from scbert_tl._cli.pretrain import options as run_options
    from scbert_tl._options import PretrainOptions

    signature = inspect.signature(scbert.tl.pretrain).parameters
    for field in dataclasses.fields(PretrainOptions):
        assert field.name in signature, field.name
        assert signature[field.name].default == field.default, field.name
    args = build_parser().parse_args(["pretrain", "a.h5ad", "--out", "m"])
    assert run_options(args) == PretrainOptions()  # the command line's defaults are the options' too
