"""Sign bits on the wire: one bit per value (1 = negative), packed eight to a byte."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pack_signs", "unpack_signs"]


def pack_signs(values: torch.Tensor) -> torch.Tensor:
    """uint8 of ceil(n / 8) bytes: bit i is 1 where values.reshape(-1)[i] < 0."""
    return torch.from_numpy(np.packbits((values.detach().reshape(-1) < 0).cpu().numpy()))


def unpack_signs(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` signs as ±1.0 float32 (inverse of `pack_signs`)."""
    negative = torch.from_numpy(np.unpackbits(packed.cpu().numpy(), count=count).astype(np.bool_))
    return torch.where(negative, -1.0, 1.0)
