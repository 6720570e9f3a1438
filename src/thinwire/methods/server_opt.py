"""Server optimizers over the aggregated update: plain, FedAvgM, FedAdam (Flower's FedOpt family)
and FedExP (Jhunjhunwala et al., ICLR 2023: an extrapolated step read off the clients' updates).

The update convention everywhere is Δ = w_start − w_end, so the server *subtracts* its step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from thinwire.config import MethodConfig


def reads_client_updates(cfg: MethodConfig) -> bool:
    """Whether the server step reads each client's update, not only their mean (FedExP): then the
    model depends on more than the noised mean under central DP, and on more than the sum under SecAgg+."""
    return cfg.server_optimizer == "fedexp"


def fedexp_scale(updates: list[dict[str, torch.Tensor]], weights: list[float], mean: dict[str, torch.Tensor],
                 eps: float) -> float:
    """max(1, Σ_i w_i ‖Δ_i‖² / (2 (‖Δ̄‖² + ε))): FedExP's server step. Why: clients that pull in
    different directions (one task each) average to an update shorter than any of them, so plain
    averaging under-steps; for M orthogonal updates of equal norm the scale is M / 2, for identical
    ones it is 1."""
    def squared(tensors: dict[str, torch.Tensor]) -> float:
        return math.fsum(float(t.double().pow(2).sum()) for t in tensors.values())

    spread = math.fsum(w * squared(u) for u, w in zip(updates, weights))
    return max(1.0, spread / (2.0 * (squared(mean) + eps)))


class ServerOptimizer:
    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, weights: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
             updates: list[dict[str, torch.Tensor]] = (), client_weights: list[float] = ()) -> dict[str, float]:
        """Apply the aggregated `delta`; FedExP also reads the clients' `updates` and their
        aggregation weights. Returns the round's metrics: FedExP's learning rate (server_lr × scale)."""
        cfg = self.cfg
        lr = cfg.server_lr
        if cfg.server_optimizer == "fedexp":
            if not updates:
                raise ValueError("FedExP scales its step by the clients' updates: pass them")
            lr *= fedexp_scale(list(updates), list(client_weights), delta, cfg.server_tau)
        for name, d in delta.items():
            if cfg.server_optimizer in ("none", "fedexp"):
                weights[name].sub_(d, alpha=lr)
            elif cfg.server_optimizer == "fedavgm":
                m = self.m.setdefault(name, torch.zeros_like(d))
                m.mul_(cfg.server_momentum).add_(d)
                weights[name].sub_(m, alpha=cfg.server_lr)
            else:
                m = self.m.setdefault(name, torch.zeros_like(d))
                v = self.v.setdefault(name, torch.zeros_like(d))
                m.mul_(cfg.server_momentum).add_(d, alpha=1 - cfg.server_momentum)
                v.mul_(cfg.server_beta2).addcmul_(d, d, value=1 - cfg.server_beta2)
                weights[name].sub_(cfg.server_lr * m / (v.sqrt() + cfg.server_tau))
        return {"server_lr": lr} if cfg.server_optimizer == "fedexp" else {}
