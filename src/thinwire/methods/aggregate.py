"""Aggregation rules shared by methods."""

from __future__ import annotations

import torch


@torch.no_grad()
def weighted_mean(updates: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i·u_i per tensor name, summed in client order (deterministic)."""
    out = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in updates[0].items()}
    for update, w in zip(updates, weights):
        for name, t in update.items():
            out[name].add_(t.float(), alpha=w)
    return out
