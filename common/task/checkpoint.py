"""Checkpoints as safetensors (tensors) + JSON (config); nothing is ever unpickled."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "save_state", "load_state"]


def _paths(path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return Path(str(p) + ".safetensors"), Path(str(p) + ".json")


def save_state(state: dict[str, torch.Tensor], path) -> Path:
    """Atomically write a state dict as safetensors (contiguous CPU copies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def load_state(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_checkpoint(model: nn.Module, path, config: dict | None = None) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (weights and buffers) and ``<path>.json`` (model config + ``config``)."""
    st, js = _paths(path)
    save_state(model.state_dict(), st)
    meta = {"model": getattr(model, "fedmerge_config", None), **(config or {})}
    tmp = js.with_name(js.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, js)
    return st, js


def load_checkpoint(path, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from the JSON config and load the safetensors weights (strict)."""
    from fedmerge.common.task.models import build_model

    st, js = _paths(path)
    if not st.exists() or not js.exists():
        raise FileNotFoundError(f"checkpoint {path}: need both {st.name} and {js.name}")
    meta = json.loads(js.read_text())
    cfg = meta.get("model")
    if not cfg:
        raise ValueError(f"{js} has no 'model' config: cannot rebuild the architecture")
    cfg = dict(cfg)
    state = load_file(str(st), device=str(device))
    head = cfg.pop("head", None)
    if head:
        emb_key = [k for k in state if k.endswith("embeddings")]
        if not emb_key:
            raise ValueError(f"{st}: the config names an embedding head but no embedding buffer is stored")
        from fedmerge.common.task.models import ClassEmbeddingHead
        head = ClassEmbeddingHead(state[emb_key[0]], temperature=head.get("temperature", 0.05))
    model = build_model(**cfg, head=head)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta
