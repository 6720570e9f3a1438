"""The one interface CG-FedLLM's rounds use for every codec of an upload: learned or fixed.

A codec turns a dict of float tensors (the trainable tensors' names and shapes, fixed when it is
built) into a small dict of wire tensors and back. Both sides build the same codec; `seed` is the
(round, client) stream a codec may draw from (a random subset, an input permutation), so client
and server draw the same thing without sending it. `encode` also returns what the server will
decode, so the client can keep an error-feedback residual and report reconstruction quality.
`check` is the server's gate: why a received upload is malformed, before anything decodes it.

A learned codec (`learned = True`, compress/autoencoder.py) is trained on the server from prepared
samples (`prepare`, `fit`) and travels as weights (`state_tensors`, `load_tensors`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["Codec"]


class Codec:
    """Tensors → wire tensors → tensors, with the same seed on both sides."""

    learned = False
    wire_names: tuple[str, ...] = ()  # the wire tensors an upload carries: exactly these

    def encode(self, tensors: Mapping[str, torch.Tensor], seed: int
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the wire tensors, what the server will decode from them)."""
        raise NotImplementedError

    def decode(self, wire: Mapping[str, torch.Tensor], seed: int, device: torch.device | str = "cpu"
               ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check(self, wire: Mapping[str, torch.Tensor]) -> str | None:
        """Why an upload's wire tensors (already named `wire_names`) are malformed, or None."""
        raise NotImplementedError

    def ratio(self) -> dict[str, float]:
        """Sent values per input value, and sent bytes per float32 input byte (`bytes_ratio`)."""
        raise NotImplementedError
