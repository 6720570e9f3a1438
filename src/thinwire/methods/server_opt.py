"""Server optimizers over the aggregated update (Flower's FedOpt family): plain, FedAvgM, FedAdam.

The update convention everywhere is Δ = w_start − w_end, so the server *subtracts* its step.
"""

from __future__ import annotations

import torch

from thinwire.config import MethodConfig


class ServerOptimizer:
    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, weights: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> None:
        cfg = self.cfg
        for name, d in delta.items():
            if cfg.server_optimizer == "none":
                weights[name].sub_(d, alpha=cfg.server_lr)
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
