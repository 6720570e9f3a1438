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

__all__ = ["TopKCodec"]



class TopKCodec:
    """Global top-k of a dict of tensors, sized to `ratio` times fewer bytes than float32."""

    def __init__(self, shapes: Sequence[tuple[str, tuple[int, ...]]], ratio: float, value_dtype: str = "float16") -> None:
        self.names = [n for n, _ in shapes]
        self.shapes = {n: tuple(s) for n, s in shapes}
        self.numels = [int(torch.Size(s).numel()) for _, s in shapes]
        self.total = sum(self.numels)
        if self.total >= 2**31:
            raise ValueError("TopKCodec: int32 positions cannot address more than 2^31 values")
        self.value_dtype = LATENT_DTYPES[value_dtype]
        per_entry = 4 + torch.finfo(self.value_dtype).bits // 8
        self.k = max(1, int(4 * self.total // (ratio * per_entry)))

    def ratio(self) -> dict[str, float]:
        """Sent values per input value, and float32 input bytes per sent byte."""
        sent = self.k * (4 + torch.finfo(self.value_dtype).bits // 8)
        return {"sent_values": self.k, "input_values": self.total, "ratio_values": self.k / self.total,
                "bytes_ratio": sent / (4 * self.total)}

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(positions int32, values, what the server will decode) of the k largest |entries|."""
        flat = torch.cat([tensors[n].detach().reshape(-1).float().cpu() for n in self.names])
        positions = torch.topk(flat.abs(), self.k, sorted=False).indices.sort().values
        values = flat[positions].to(self.value_dtype)
        return positions.int(), values, self.decode(positions.int(), values, next(iter(tensors.values())).device)

    def decode(self, positions: torch.Tensor, values: torch.Tensor, device: torch.device | str = "cpu"
               ) -> dict[str, torch.Tensor]:
        flat = torch.zeros(self.total)
        flat[positions.long()] = values.float()
        return {n: part.view(self.shapes[n]).to(device) for n, part in zip(self.names, flat.split(self.numels))}

    def check(self, positions: torch.Tensor, values: torch.Tensor) -> str | None:
        """Why an upload is malformed, or None."""
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
