"""Scaled signs of a seeded random subset: a 1-bit codec that fits FedIT's upload into 1/64.

Why not top-k alone: a LoRA round's change is close to Gaussian, so the top 1% of its entries
(what 1/64 buys at 6 bytes an entry) hold ~6-8% of its energy. One sign bit per entry with a
least-squares scale per tensor keeps 2/π ≈ 64% of the energy of the entries it covers; at 1/64 of
the float32 bytes that is a random half of the entries, ~32% of the energy, and the positions cost
nothing because client and server draw the same subset from the (round, client) seed. What is
left out goes into the client's error-feedback residual and is sent in later rounds (signSGD with
error feedback, Karimireddy et al. 2019; here over a fresh random half each round).

Wire: `signs` (uint8, the subset's sign bits packed in position order, 1 = negative) and
`scales` (float32, one per tensor: the mean |x| of its entries in the subset). The budget counts
both: m = 8·(⌊4·P/ratio⌋ − 4·T) sign bits for P values in T tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from thinwire.compress.bits import pack_signs, unpack_signs
from thinwire.compress.fixed import FixedCodec

__all__ = ["SignCodec"]


class SignCodec(FixedCodec):
    """Signs of m seeded random entries, one scale per tensor, `ratio` times fewer bytes than float32."""

    wire_names = ("signs", "scales")

    def __init__(self, shapes: Sequence[tuple[str, tuple[int, ...]]], ratio: float) -> None:
        super().__init__(shapes)
        budget = int(4 * self.total // ratio) - 4 * len(self.names)
        if budget < 1:
            raise ValueError(f"compression {ratio} leaves no room for sign bits next to "
                             f"{len(self.names)} float32 scales; lower it")
        self.m = min(self.total, 8 * budget)
        self.offsets = torch.tensor([0, *np.cumsum(self.numels).tolist()])

    def sent_values(self) -> int:
        return self.m

    def sent_bytes(self) -> int:
        return (self.m + 7) // 8 + 4 * len(self.names)

    def subset(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted positions, the tensor each belongs to) of the seed's m entries."""
        gen = torch.Generator().manual_seed(seed)
        positions = torch.randperm(self.total, generator=gen)[: self.m].sort().values
        return positions, torch.bucketize(positions, self.offsets[1:], right=True)

    def encode(self, tensors: Mapping[str, torch.Tensor], seed: int
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        flat = self.flatten(tensors)
        positions, owner = self.subset(seed)
        chosen = flat[positions]
        sums = torch.zeros(len(self.names), dtype=torch.float64).index_add_(0, owner, chosen.abs().double())
        counts = torch.bincount(owner, minlength=len(self.names)).clamp(min=1)
        wire = {"signs": pack_signs(chosen), "scales": (sums / counts).float()}
        return wire, self.decode(wire, seed, next(iter(tensors.values())).device)

    def decode(self, wire: Mapping[str, torch.Tensor], seed: int, device: torch.device | str = "cpu"
               ) -> dict[str, torch.Tensor]:
        positions, owner = self.subset(seed)
        flat = torch.zeros(self.total)
        flat[positions] = unpack_signs(wire["signs"], self.m) * wire["scales"][owner]
        return self.unflatten(flat, device)

    def check(self, wire: Mapping[str, torch.Tensor]) -> str | None:
        signs, scales = wire["signs"], wire["scales"]
        if signs.dtype != torch.uint8 or signs.shape != ((self.m + 7) // 8,):
            return f"signs must be uint8 of shape ({(self.m + 7) // 8},)"
        if scales.dtype != torch.float32 or scales.shape != (len(self.names),):
            return f"scales must be float32 of shape ({len(self.names)},)"
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            return "scales must be finite and non-negative"
        return None
