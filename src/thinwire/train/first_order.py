"""The local first-order training loop: T optimizer steps over seeded mini-batches, read top to bottom."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from thinwire.config import TrainConfig
from thinwire.data.template import collate, encode_example


@dataclass
class TrainStats:
    loss: float
    steps: int
    tokens: int
    seconds: float


def batch_stream(examples: list[dict], tokenizer: PreTrainedTokenizerBase, batch_size: int,
                 max_length: int, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless mini-batches: a fresh seeded permutation per pass over the client's examples."""
    encoded = [encode_example(tokenizer, e, max_length) for e in examples]
    while True:
        order = rng.permutation(len(encoded))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if len(chunk) < batch_size and len(order) >= batch_size:
                chunk = np.concatenate([chunk, order[: batch_size - len(chunk)]])
            yield collate([encoded[i] for i in chunk], tokenizer.pad_token_id)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_local(model: torch.nn.Module, params: list[torch.nn.Parameter],
                batches: Iterator[dict[str, torch.Tensor]], cfg: TrainConfig,
                on_step: Callable[[], None] | None = None) -> TrainStats:
    """Run `cfg.local_steps` optimizer steps of `cfg.grad_accum` micro-batches each."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(params, cfg)
    model.train()
    start, total_loss, tokens = time.perf_counter(), 0.0, 0
    for _ in range(cfg.local_steps):
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = model(**batch).loss / cfg.grad_accum
            loss.backward()
            total_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step()
    model.eval()
    return TrainStats(loss=total_loss / cfg.local_steps, steps=cfg.local_steps, tokens=tokens,
                      seconds=time.perf_counter() - start)
