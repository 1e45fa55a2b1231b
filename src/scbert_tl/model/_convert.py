"""Read the state dicts of the original scBERT code, the nano-scBERT conversion, and our own format."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

import torch

from ._config import ScBERTConfig

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._network import ScBERTNetwork

CheckpointFormat = Literal["scbert-original", "nano-scbert", "scbert-tl"]

_LAYER = re.compile(r"^performer\.net\.layers\.(\d+)\.([01])\.(.+)$")
_OWN_LAYER = re.compile(r"^layers\.(\d+)\.")
# keys the original code saves that carry no weights
_IGNORED = ("performer.calls_since_last_redraw", "performer.proj_updater.calls_since_last_redraw")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as an scBERT network (missing, extra or mis-shaped tensors)."""


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def detect_format(state: Mapping[str, torch.Tensor]) -> CheckpointFormat:
    """Tell which of the three known layouts a (prefix-stripped) state dict has."""
    keys = list(state)
    if any(k.startswith("performer.net.layers.") for k in keys):
        return "nano-scbert" if any(k.endswith(".0.fn.to_qkv.weight") for k in keys) else "scbert-original"
    if any(_OWN_LAYER.match(k) for k in keys):
        return "scbert-tl"
    sample = ", ".join(keys[:5]) or "no tensors at all"
    raise CheckpointError(
        "This file is not an scBERT checkpoint: expected keys like 'performer.net.layers.0.0.fn.to_q.weight' "
        f"(original scBERT) or 'layers.0.attn.to_qkv.weight' (scbert-tl); found {sample}."
    )


def _need(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"The checkpoint has no tensor {key!r}; the file is truncated or not an scBERT model.")
    return state[key]


def _convert_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original / nano-scBERT keys to ours (q, k, v are stacked into one ``to_qkv``)."""
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _IGNORED or key.startswith("performer.proj_updater."):
            continue  # redraw counters, and performer-pytorch's second reference to the same layers
        m = _LAYER.match(key)
        if m:
            i, sub, rest = int(m.group(1)), m.group(2), m.group(3)
            if sub == "0":
                if rest.startswith("norm."):
                    out[f"layers.{i}.attn_norm.{rest[5:]}"] = value
                elif rest == "fn.fast_attention.projection_matrix":
                    out[f"layers.{i}.attn.projection_matrix"] = value
                elif rest in ("fn.to_q.weight", "fn.to_k.weight", "fn.to_v.weight"):
                    pending_qkv.setdefault(i, {})[rest[len("fn.to_")]] = value
                elif rest == "fn.to_qkv.weight":
                    out[f"layers.{i}.attn.to_qkv.weight"] = value
                elif rest.startswith("fn.to_out."):
                    out[f"layers.{i}.attn.to_out.{rest[10:]}"] = value
                else:
                    raise CheckpointError(f"Unexpected tensor {key!r} in the attention block of layer {i}.")
            else:
                if rest.startswith("norm."):
                    out[f"layers.{i}.ff_norm.{rest[5:]}"] = value
                elif rest.startswith("fn.fn."):
                    out[f"layers.{i}.ff.{rest[6:]}"] = value
                else:
                    raise CheckpointError(f"Unexpected tensor {key!r} in the feed-forward block of layer {i}.")
        elif key == "pos_emb.emb.weight":
            out["gene_emb.weight"] = value
        elif key.startswith("to_out.conv1."):
            name = key[len("to_out.conv1.") :]
            out[f"classifier.reduce.{name}"] = value.reshape(1, -1) if name == "weight" else value
        elif key.startswith(("to_out.fc1.", "to_out.fc2.", "to_out.fc3.")):
            out["classifier." + key[len("to_out.") :]] = value
        elif key in ("to_out.weight", "to_out.bias"):
            out["lm_head." + key[len("to_out.") :]] = value
        elif key.startswith(("token_emb.", "norm.")):
            out[key] = value
        else:
            raise CheckpointError(f"Unexpected tensor {key!r}: not part of an scBERT network.")
    for i, parts in sorted(pending_qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            names = ", ".join(f"'performer.net.layers.{i}.0.fn.to_{p}.weight'" for p in missing)
            raise CheckpointError(f"The checkpoint has no tensor {names}; the file is truncated.")
        shapes = {p: tuple(parts[p].shape) for p in "qkv"}
        if len(set(shapes.values())) != 1:
            raise CheckpointError(f"Layer {i}: to_q/to_k/to_v have different shapes {shapes}.")
        out[f"layers.{i}.attn.to_qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def infer_config(state: Mapping[str, torch.Tensor], **overrides) -> ScBERTConfig:
    """Infer the architecture of a state dict in our key layout from its tensor shapes."""
    num_tokens, dim = _need(state, "token_emb.weight").shape
    seq_len = _need(state, "gene_emb.weight").shape[0]
    depth = 1 + max((int(m.group(1)) for k in state if (m := _OWN_LAYER.match(k))), default=-1)
    if depth == 0:
        raise CheckpointError("The checkpoint has no encoder layers ('layers.0....' tensors are missing).")
    n_features, dim_head = _need(state, "layers.0.attn.projection_matrix").shape
    inner = _need(state, "layers.0.attn.to_qkv.weight").shape[0] // 3
    ff_hidden = _need(state, "layers.0.ff.w1.weight").shape[0]
    kwargs = {
        "n_genes": seq_len - 1,
        "n_bins": num_tokens - 2,
        "dim": dim,
        "depth": depth,
        "heads": inner // dim_head,
        "dim_head": dim_head,
        "n_features": n_features,
        "ff_mult": ff_hidden // dim,
        "lm_head": "lm_head.weight" in state,
        "n_classes": 0,
    }
    if "classifier.fc3.weight" in state:
        kwargs["n_classes"] = state["classifier.fc3.weight"].shape[0]
        kwargs["classifier_hidden"] = (state["classifier.fc1.weight"].shape[0], state["classifier.fc2.weight"].shape[0])
    kwargs.update(overrides)
    return ScBERTConfig(**kwargs)


def to_own_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], CheckpointFormat]:
    """Any known layout (with or without a DDP ``module.`` prefix) to our key layout."""
    state = _strip_prefix(state)
    fmt = detect_format(state)
    if fmt != "scbert-tl":
        state = _convert_original(state)
    return state, fmt


def load_into(network: ScBERTNetwork, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` (our layout) into ``network``, naming any missing, unexpected or mis-shaped tensor."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(
            f"The checkpoint is missing {len(missing)} tensor(s), first {missing[:5]}; the file is truncated "
            "or belongs to another architecture."
        )
    if unexpected:
        raise CheckpointError(f"The checkpoint has {len(unexpected)} unexpected tensor(s), first {unexpected[:5]}.")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"Tensor {k!r} has shape {tuple(state[k].shape)} but the architecture needs {tuple(v.shape)}."
            )
        if not torch.isfinite(state[k]).all():
            raise CheckpointError(f"Tensor {k!r} contains NaN or infinite values; the checkpoint is corrupt.")
    network.load_state_dict(state, strict=True)
