"""Resolve a model spec (built-in name, hub id, local directory, .gguf file) to a model and tokenizer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from thinwire.config import ModelConfig
from thinwire.errors import UsageError
from thinwire.models.pretrained import from_pretrained

BUILTIN = ("tiny", "smollm2-135m", "tiny-small", "smollm2-small")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"model.device = {spec!r} is not a torch device; use auto, cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"model.device = {spec!r} but CUDA is not available; use model.device=cpu")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, spec)


def load_model(cfg: ModelConfig, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and tokenizer named by `cfg`, on its device and dtype, in eval mode."""
    model, tokenizer = _load(cfg, seed)
    device = resolve_device(cfg.device)
    model.to(device=device, dtype=resolve_dtype(cfg.dtype, device))
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


SMALL_MODELS = ("tiny-small", "smollm2-small")  # built-in device models that share a large model's vocabulary
# each built-in large model and its built-in small pair (FedPT's default device model)
SMALL_PAIRS = {"tiny": "tiny-small", "smollm2-135m": "smollm2-small"}


def large_of(small: str) -> str | None:
    """The built-in large model whose pair `small` is (None: it is no built-in small model)."""
    return next((large for large, paired in SMALL_PAIRS.items() if paired == small), None)


def _load(cfg: ModelConfig, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    name = cfg.name
    if name == "tiny":
        from thinwire.models.tiny import build_tiny

        return build_tiny(seed)
    if name in SMALL_MODELS:
        from thinwire.models.small import load_small, recipe_of

        return load_small(name, seed, recipe_of(cfg))
    if name == "smollm2-135m":
        from thinwire.models.smollm2 import prepare

        return from_pretrained(str(prepare()), local_only=True)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"model file {path} does not exist; pass an existing .gguf file")
        return from_pretrained(str(path.parent), local_only=True, gguf_file=path.name)
    if path.is_dir():
        return from_pretrained(str(path), local_only=True)
    if path.exists() or name.startswith((".", "/", "~")):
        raise UsageError(f"model {name!r} is not a model directory or .gguf file")
    if name.count("/") != 1:
        raise UsageError(f"unknown model {name!r}; use one of {', '.join(BUILTIN)}, a hub id, "
                         "a local directory or a .gguf file (see `thinwire models`)")
    return _from_hub(name)


def _from_hub(repo_id: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Cached copy first; then the hub with short timeouts, so an unreachable hub fails fast."""
    try:
        return from_pretrained(repo_id, local_only=True)
    except UsageError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(f"model {repo_id!r} is not cached and HF_HUB_OFFLINE=1; "
                         "download it on a connected machine or pass a local directory")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    return from_pretrained(repo_id, local_only=False)


def vocab_rows(model: torch.nn.Module) -> int:
    """Rows of the model's output layer (a plain or a factorised LM head: both have out_features)."""
    return int(model.get_output_embeddings().out_features)


def trainable_named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Unique trainable parameters in a fixed order (tied weights appear once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def weights_digest(model: torch.nn.Module, samples: int = 4096) -> str:
    """SHA-256 of every parameter's name, shape, dtype and up to `samples` evenly strided values:
    two parties compare it at handshake to prove they start from the same base weights (different
    checkpoints differ nearly everywhere, so a sample finds it without hashing every byte)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // samples)
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        digest.update(flat[::stride].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
