"""Ferret's structured basis option: hashed signed buckets (a count sketch), O(d) per block.

Why: the dense bases cost K_l·d_l generated values per block and client (≈20 s per SmolLM2-135M
client on 2 cores), which keeps Ferret's round above FedAvg's. Here a block's k_max basis vectors
split its d_l entries between them: entry i belongs to basis h(i) ∈ [0, k_max) with sign s(i) = ±1,
i.e. v_j = Σ_{i: h(i)=j} s(i)·e_i. Entries of v_j are 0 or ±1 with P(±1) = 1/k_max, so
E[v_j v_jᵀ] = I/k_max: the same ρ K scaling as the dense bases makes the reconstruction unbiased,
γ_j = (k_max/K_l)·v_jᵀΔ, and its error E‖Δ̃−Δ‖² = ((d_l − 1)/K_l + k_max/K_l − 1)·‖Δ_l‖² is the dense
bases' (d_l + κ − 2)/K_l·‖Δ_l‖² up to k_max/K_l, for any Δ (measured in benchmarks/ferret_codec.py). The cost is
one 32-bit draw per entry per round, whatever K_l: projection is a signed bucket sum, reconstruction
a table lookup.

A client with K_l coordinates uses bases 0..K_l−1 (the entries hashed there); the others are
dropped, which the k_max/K_l factor makes up for in expectation. Everyone agrees because h and s
come from the shared seed: entries [c·GRID, (c+1)·GRID) of block l in round r come from a
``torch.Generator`` seeded with ``fmix32(key_r + Σ_{l'<l} chunks(l') + c)``,
``key_r = derive_seed(run_seed, "ferret-sketch", r)``; each entry takes one 32-bit lane of the
generator's 64-bit words: its top bit is the sign, and h = ⌊(low 31 bits)·k_max / 2^31⌋ (so
P(h = j) is 1/k_max to within k_max/2^31 < 1e-7).

Reconstruction writes ±γ_{h(i)} into each entry, exact in float32, so it is bit-identical in
every process, thread count and chunking.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from thinwire.compress.projection import (
    _M32,
    GRID,
    Block,
    BlockCodec,
    ProjectionCodec,
    _fmix32,
    _ordered_map,
    _workers,
)
from thinwire.seeding import derive_seed

__all__ = ["SketchCodec", "make_codec"]


class SketchCodec(BlockCodec):
    """Hashed signed-bucket bases over a fixed list of parameters (drop-in for ProjectionCodec)."""

    def __init__(self, blocks: Sequence[Block], run_seed: int, *, k_max: int = 200, threads: int | None = None) -> None:
        super().__init__(blocks, run_seed, k_max=k_max, threads=threads)
        self._offsets = np.cumsum([0] + [b.n_chunks for b in self.blocks[:-1]]).tolist()
        if sum(b.n_chunks for b in self.blocks) >= 2**32:
            raise ValueError("SketchCodec: too many chunks for 32-bit seeding")

    def rho(self, block: int) -> float:
        """Per-entry variance of a basis vector: ±1 with probability 1/k_max."""
        return 1.0 / self.k_max

    def seed(self, round_idx: int, block: int, chunk: int) -> int:
        key = derive_seed(self.run_seed, "ferret-sketch", int(round_idx)) & _M32
        return int(_fmix32(np.array([self._offsets[block] + chunk + key], dtype=np.uint64))[0])

    def hash_chunk(self, round_idx: int, block: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket h as int64, sign s as float32 ±1) of the entries of one grid chunk."""
        n = min(GRID, self.blocks[block].size - chunk * GRID)
        gen = torch.Generator().manual_seed(self.seed(round_idx, block, chunk))
        lanes = torch.empty(-(-n // 2), dtype=torch.int64).random_(-(2**63), None, generator=gen)
        lanes = lanes.view(torch.int32)[:n]
        bucket = (lanes.long() & 0x7FFFFFFF).mul_(self.k_max).bitwise_right_shift_(31)
        sign = lanes.bitwise_right_shift(31).float().mul_(2.0).add_(1.0)  # top bit set → −1
        return bucket, sign

    def basis(self, round_idx: int, block: int, j0: int, j1: int) -> torch.Tensor:
        """Bases j0..j1−1 of a block as a dense [j, d_l] float32 tensor (for tests)."""
        parts = []
        for c in range(self.blocks[block].n_chunks):
            bucket, sign = self.hash_chunk(round_idx, block, c)
            parts.append((bucket.unsqueeze(0) == torch.arange(j0, j1).unsqueeze(1)).float() * sign)
        return torch.cat(parts, dim=1)

    def project(
        self, delta: Mapping[str, torch.Tensor], round_idx: int, ks: Sequence[int], *, scaling: str = "unbiased"
    ) -> list[torch.Tensor]:
        """Coordinates γ_l = (k_max/K_l)·V_lᵀΔ_l on the first K_l bases of each block."""
        self._check_ks(ks, scaling)
        if scaling != "unbiased":
            raise ValueError("project: the sketch basis has only the unbiased scaling (the code's d/K is for dense bases)")
        units = [(blk, int(k), c) for blk, k in zip(self.blocks, ks) if k for c in range(blk.n_chunks)]
        flats = {blk.index: blk.gather(delta) for blk, k in zip(self.blocks, ks) if k}

        def run(unit):
            blk, k, c = unit
            bucket, sign = self.hash_chunk(round_idx, blk.index, c)
            signed = flats[blk.index][c * GRID : (c + 1) * GRID] * sign
            # all k_max buckets are summed (masking costs more); those ≥ K_l are dropped after
            return blk.index, torch.bincount(bucket, weights=signed.double(), minlength=self.k_max)[:k]

        sums = {blk.index: torch.zeros(int(k), dtype=torch.float64) for blk, k in zip(self.blocks, ks) if k}
        with _workers(self.threads) as (pool, _):
            for l, part in _ordered_map(run, units, pool, 2 * self.threads):
                sums[l] += part
        return [(sums[blk.index] * (self.k_max / k)).float() if k else torch.zeros(0) for blk, k in zip(self.blocks, ks)]

    def iter_reconstruct(
        self, coords: Sequence[torch.Tensor], round_idx: int, *, clip: float | None = None
    ) -> Iterator[tuple[Block, torch.Tensor]]:
        """Yield (block, Δ̃_l flat float32), Δ̃_l[i] = s(i)·γ_{h(i)}, block by block.

        `clip` scales each piece γ_j v_j down to norm ≤ clip (‖v_j‖² = entries hashed to j).
        """
        checked = self._check_coords(coords)
        with _workers(self.threads) as (pool, saved):
            for blk, g in zip(self.blocks, checked):
                if not bool(g.any()):
                    yield blk, torch.zeros(blk.size)
                    continue
                if clip is not None and float(g.abs().max()) * math.sqrt(blk.size) > clip:  # ‖v_j‖ ≤ √d_l
                    g = self._clip(round_idx, blk, g, float(clip), pool)
                table = torch.zeros(self.k_max)
                table[: g.numel()] = g.float()

                def run(c, blk=blk, table=table):
                    bucket, sign = self.hash_chunk(round_idx, blk.index, c)
                    return c, table.index_select(0, bucket).mul_(sign)

                out = torch.empty(blk.size)
                for c, piece in _ordered_map(run, range(blk.n_chunks), pool, 2 * self.threads):
                    out[c * GRID : c * GRID + piece.numel()] = piece
                torch.set_num_threads(saved)
                try:
                    yield blk, out
                finally:
                    torch.set_num_threads(1)

    def _clip(self, round_idx: int, blk: Block, g: torch.Tensor, clip: float, pool) -> torch.Tensor:
        """γ_j scaled so that ‖γ_j v_j‖ = |γ_j|·√(entries hashed to j) ≤ clip."""
        counts = torch.zeros(self.k_max, dtype=torch.int64)

        def run(c):
            return torch.bincount(self.hash_chunk(round_idx, blk.index, c)[0], minlength=self.k_max)

        for part in _ordered_map(run, range(blk.n_chunks), pool, 2 * self.threads):
            counts += part
        norms = g.abs() * counts[: g.numel()].double().sqrt()
        return torch.where(norms > clip, g * (clip / (norms + 1e-8)), g)


def make_codec(
    blocks: Sequence[Block], run_seed: int, basis: str, *, k_max: int = 200, threads: int | None = None
) -> BlockCodec:
    """The Ferret codec for a basis name: ``"sketch"`` or one of ProjectionCodec's distributions."""
    if basis == "sketch":
        return SketchCodec(blocks, run_seed, k_max=k_max, threads=threads)
    return ProjectionCodec(blocks, run_seed, k_max=k_max, dist=basis, threads=threads)
