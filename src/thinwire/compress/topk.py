"""Top-k sparsification over a fixed list of tensors: the non-learned codec CG-FedLLM is measured against.

Why it is here: at 1/64 the learned autoencoder's output barely depends on its input
(ALGORITHMS.md §4), while keeping the k largest-magnitude entries of the whole update (global,
across tensors) and feeding the rest back through the client's error-feedback residual is the
standard way to reach that ratio. The budget is set in bytes against the uncompressed float32
upload: with `ratio` = 64 and 16-bit values plus 32-bit positions, k = ⌊4·P / (64·6)⌋ = ⌊P/96⌋.
Positions are strictly increasing int32 indices into the tensors' concatenation (names in order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from thinwire.compress.autoencoder import LATENT_DTYPES
from thinwire.compress.fixed import FixedCodec

__all__ = ["TopKCodec"]


class TopKCodec(FixedCodec):
    """Global top-k of a dict of tensors, sized to `ratio` times fewer bytes than float32."""

    wire_names = ("positions", "values")

    def __init__(self, shapes: Sequence[tuple[str, tuple[int, ...]]], ratio: float, value_dtype: str = "float16") -> None:
        super().__init__(shapes)
        self.value_dtype = LATENT_DTYPES[value_dtype]
        self.per_entry = 4 + torch.finfo(self.value_dtype).bits // 8
        self.k = max(1, int(4 * self.total // (ratio * self.per_entry)))

    def sent_values(self) -> int:
        return self.k

    def sent_bytes(self) -> int:
        return self.k * self.per_entry

    def encode(self, tensors: Mapping[str, torch.Tensor], seed: int = 0
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        flat = self.flatten(tensors)
        positions = torch.topk(flat.abs(), self.k, sorted=False).indices.sort().values
        wire = {"positions": positions.int(), "values": flat[positions].to(self.value_dtype)}
        return wire, self.decode(wire, seed, next(iter(tensors.values())).device)

    def decode(self, wire: Mapping[str, torch.Tensor], seed: int = 0, device: torch.device | str = "cpu"
               ) -> dict[str, torch.Tensor]:
        flat = torch.zeros(self.total)
        flat[wire["positions"].long()] = wire["values"].float()
        return self.unflatten(flat, device)

    def check(self, wire: Mapping[str, torch.Tensor]) -> str | None:
        positions, values = wire["positions"], wire["values"]
        if positions.dtype != torch.int32 or positions.shape != (self.k,):
            return f"positions must be int32 of shape ({self.k},)"
        if values.dtype != self.value_dtype or values.shape != (self.k,):
            return f"values must be {self.value_dtype} of shape ({self.k},)"
        if not bool(torch.isfinite(values.float()).all()):
            return "non-finite values"
        p = positions.long()
        if int(p.min()) < 0 or int(p.max()) >= self.total or not bool((p[1:] > p[:-1]).all()):
            return f"positions must be strictly increasing within [0, {self.total})"
        return None
