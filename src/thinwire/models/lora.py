"""LoRA adapters through peft, initialised from a seeded generator."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from thinwire.config import ModelConfig
from thinwire.errors import UsageError


def add_lora(model: PreTrainedModel, cfg: ModelConfig, seed: int) -> PeftModel:
    """Wrap `model` with a LoRA adapter; peft draws A from global RNG, so fork and seed it."""
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise UsageError(f"model.lora_targets {cfg.lora_targets} do not match the model's modules: "
                             f"{str(exc).splitlines()[0]}") from exc


ADAPTER = "default"  # the adapter name add_lora creates


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules the adapter wraps, by module name, in model order."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def peft_a_draw(shape: tuple[int, int], seed: int, *keys: object) -> torch.Tensor:
    """A LoRA A (r×din) as PEFT initialises it, U(±1/√din) (kaiming_uniform with a = √5), in
    float32 from the stream (seed, *keys) rather than the global RNG."""
    from thinwire.seeding import torch_generator

    bound = 1.0 / shape[1] ** 0.5
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=torch_generator(seed, *keys))


@torch.no_grad()
def freeze_shared_a(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Draw every lora_A from its own stream (seed, module name) as PEFT's default U(±1/√din) and
    freeze it (FFA-LoRA, ALGORITHMS.md §7.1). Every party derives the same bits from the run seed
    alone, whatever order peft built the modules in, so A never needs to travel. Returns the A
    tensors by parameter name (drawn again only when some A is still trainable)."""
    out = {}
    for name, layer in lora_layers(model).items():
        weight = layer.lora_A[ADAPTER].weight
        if weight.requires_grad:
            weight.copy_(peft_a_draw(tuple(weight.shape), seed, "ffa-lora-A", name))
            weight.requires_grad_(False)
        out[f"{name}.lora_A.{ADAPTER}.weight"] = weight.detach()
    return out
