"""Checkpoint formats: the original scBERT layout, the nano-scBERT conversion, and our own directory."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from scbert_tl import ScBERT
from scbert_tl.model import CheckpointError

GENES = [f"G{i}" for i in range(40)]
SMALL = {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16, "n_features": 20}


def _to_original(state: dict[str, torch.Tensor], *, fused: bool) -> dict[str, torch.Tensor]:
    """Write our state dict with the original code's key names (written here independently of the loader)."""
    out = {"performer.calls_since_last_redraw": torch.tensor(0)}
    for key, v in state.items():
        parts = key.split(".")
        if parts[0] == "layers":
            i, block, rest = parts[1], parts[2], ".".join(parts[3:])
            pre = f"performer.net.layers.{i}"
            if block == "attn_norm":
                out[f"{pre}.0.norm.{rest}"] = v
            elif block == "ff_norm":
                out[f"{pre}.1.norm.{rest}"] = v
            elif block == "ff":
                out[f"{pre}.1.fn.fn.{rest}"] = v
            elif rest == "projection_matrix":
                out[f"{pre}.0.fn.fast_attention.projection_matrix"] = v
            elif rest == "to_qkv.weight":
                if fused:
                    out[f"{pre}.0.fn.to_qkv.weight"] = v
                else:
                    q, k, vv = v.chunk(3)
                    out.update(
                        {f"{pre}.0.fn.to_q.weight": q, f"{pre}.0.fn.to_k.weight": k, f"{pre}.0.fn.to_v.weight": vv}
                    )
            else:
                out[f"{pre}.0.fn.{rest}"] = v
        elif parts[0] == "gene_emb":
            out["pos_emb.emb.weight"] = v
        elif parts[0] == "lm_head":
            out[f"to_out.{parts[1]}"] = v
        elif parts[0] == "classifier":
            if parts[1] == "reduce":
                out[f"to_out.conv1.{parts[2]}"] = v.reshape(1, 1, 1, -1) if parts[2] == "weight" else v
            else:
                out[f"to_out.{parts[1]}.{parts[2]}"] = v
        else:
            out[key] = v
    return out


@pytest.fixture
def model():
    m = ScBERT.new(GENES, seed=3, **SMALL)
    with torch.no_grad():
        m.network.gene_emb.weight.normal_()
        m.network.gene_emb.weight[-1].zero_()
    return m.to("cpu")


@pytest.fixture
def classifier():
    m = ScBERT.new(GENES, seed=4, lm_head=False, **SMALL)
    m.network.add_classifier(3, hidden=(16, 8))
    m.classes = ["B", "T", "NK"]
    return m


@pytest.fixture
def tokens():
    return torch.randint(0, 6, (3, len(GENES)), generator=torch.Generator().manual_seed(0))


def _encode(m: ScBERT, tokens):
    m.network.eval()
    with torch.no_grad():
        return m.network.encode(tokens)


@pytest.mark.parametrize("fused", [False, True], ids=["original", "nano"])
@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "module-prefix"])
def test_original_and_nano_formats_load_to_identical_outputs(tmp_path, model, tokens, fused, ddp):
    state = _to_original(model.network.state_dict(), fused=fused)
    if ddp:
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "model_state_dict": state, "losses": 0.5}, path)
    loaded = ScBERT.load(path, genes=GENES)
    assert loaded.provenance["format"] == ("nano-scbert" if fused else "scbert-original")
    expected = model.config.to_dict() | {"gene_emb_trainable": False}  # original checkpoints carry fixed gene2vec
    assert loaded.config.to_dict() == expected
    assert torch.equal(_encode(loaded, tokens), _encode(model, tokens))


def test_original_finetuned_checkpoint_with_label_names(tmp_path, classifier, tokens):
    path = tmp_path / "finetuned.pth"
    torch.save({"model_state_dict": _to_original(classifier.network.state_dict(), fused=False)}, path)
    loaded = ScBERT.load(path, genes=GENES, classes=["B", "T", "NK"])
    assert loaded.classes == ["B", "T", "NK"]
    assert loaded.config.n_classes == 3 and loaded.config.classifier_hidden == (16, 8)
    with torch.no_grad():
        assert torch.equal(loaded.network.eval()(tokens), classifier.network.eval()(tokens))


def test_missing_tensor_is_named(tmp_path, model):
    state = _to_original(model.network.state_dict(), fused=False)
    del state["performer.net.layers.1.1.fn.fn.w2.weight"]
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"layers\.1\.ff\.w2\.weight"):
        ScBERT.load(tmp_path / "x.pth", genes=GENES)


def test_missing_qkv_part_is_named(tmp_path, model):
    state = _to_original(model.network.state_dict(), fused=False)
    del state["performer.net.layers.0.0.fn.to_k.weight"]
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"performer\.net\.layers\.0\.0\.fn\.to_k\.weight"):
        ScBERT.load(tmp_path / "x.pth", genes=GENES)


def test_misshaped_tensor_is_named(tmp_path, model):
    state = _to_original(model.network.state_dict(), fused=True)
    state["performer.net.layers.1.0.fn.to_out.bias"] = torch.zeros(31)
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.to_out\.bias.*\(31,\).*\(32,\)"):
        ScBERT.load(tmp_path / "x.pth", genes=GENES)


def test_truncated_file(tmp_path, model):
    path = tmp_path / "x.pth"
    torch.save(_to_original(model.network.state_dict(), fused=True), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ScBERT.load(path, genes=GENES)


def test_not_an_scbert_file(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="not an scBERT checkpoint"):
        ScBERT.load(tmp_path / "x.pth", genes=GENES)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model_state_dict": {}, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="will not unpickle"):
        ScBERT.load(tmp_path / "x.pth", genes=GENES)


def test_wrong_gene_count(tmp_path, model):
    torch.save(_to_original(model.network.state_dict(), fused=True), tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="40 gene positions but 39 gene names"):
        ScBERT.load(tmp_path / "x.pth", genes=GENES[:-1])
    with pytest.raises(CheckpointError, match="pass genes="):
        ScBERT.load(tmp_path / "x.pth")


def test_save_load_round_trip_is_bit_exact(tmp_path, classifier, tokens):
    classifier.history = [{"epoch": 1, "val_accuracy": 0.5}]
    classifier.provenance["note"] = "test"
    path = classifier.save(tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.pt"]
    loaded = ScBERT.load(path)
    assert loaded.genes == classifier.genes and loaded.classes == classifier.classes
    assert loaded.config.to_dict() == classifier.config.to_dict()
    assert loaded.history == classifier.history and loaded.provenance["note"] == "test"
    for (k, a), (k2, b) in zip(
        classifier.network.state_dict().items(), loaded.network.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(loaded.network.eval()(tokens), classifier.network.eval()(tokens))


def test_save_refuses_to_overwrite(tmp_path, model):
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an scbert-tl model"):
        model.save(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_corrupt_own_format(tmp_path, model):
    path = model.save(tmp_path / "m")
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["dim"] = 48
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"token_emb\.weight.*shape"):
        ScBERT.load(path)
    (path / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="model.pt is missing"):
        ScBERT.load(path)


def test_nan_weights_are_refused(tmp_path, model):
    state = model.network.state_dict()
    state["norm.weight"] = torch.full_like(state["norm.weight"], float("nan"))
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="norm.weight.*NaN"):
        ScBERT.load(tmp_path / "x.pth", genes=GENES)
