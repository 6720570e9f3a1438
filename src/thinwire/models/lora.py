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
