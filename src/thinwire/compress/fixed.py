"""The shared base of the codecs that need no training (top-k, signs, zeros): tensors flattened in
a fixed order into one float32 vector (compress/codec.py says what a codec does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from thinwire.compress.codec import Codec

__all__ = ["FixedCodec", "ZerosCodec"]


class FixedCodec(Codec):
    """Flattens tensors in a fixed order into one float32 vector, and back."""

    def __init__(self, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        self.names = [n for n, _ in shapes]
        self.shapes = {n: tuple(s) for n, s in shapes}
        self.numels = [int(torch.Size(s).numel()) for _, s in shapes]
        self.total = sum(self.numels)
        if self.total >= 2**31:
            raise ValueError(f"{type(self).__name__}: int32 positions cannot address more than 2^31 values")

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].detach().reshape(-1).float().cpu() for n in self.names])

    def unflatten(self, flat: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {n: part.view(self.shapes[n]).to(device) for n, part in zip(self.names, flat.split(self.numels))}

    def sent_bytes(self) -> int:
        raise NotImplementedError

    def sent_values(self) -> int:
        raise NotImplementedError

    def ratio(self) -> dict[str, float]:
        """Sent values per input value, and sent bytes per float32 input byte."""
        return {"sent_values": self.sent_values(), "input_values": self.total,
                "ratio_values": self.sent_values() / self.total, "bytes_ratio": self.sent_bytes() / (4 * self.total)}


class ZerosCodec(FixedCodec):
    """Sends nothing and decodes zeros: the control that shows what the compressed rounds add."""

    def sent_values(self) -> int:
        return 0

    def sent_bytes(self) -> int:
        return 0

    def encode(self, tensors: Mapping[str, torch.Tensor], seed: int
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return {}, self.decode({}, seed, next(iter(tensors.values())).device)

    def decode(self, wire: Mapping[str, torch.Tensor], seed: int, device: torch.device | str = "cpu"
               ) -> dict[str, torch.Tensor]:
        return self.unflatten(torch.zeros(self.total), device)

    def check(self, wire: Mapping[str, torch.Tensor]) -> str | None:
        return None
