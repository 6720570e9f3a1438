"""A method's update space: where DP clips and noises an upload and SecAgg+ masks it.

A method that can run under DP or SecAgg+ declares one (`ServerSide.update_space`): how to read
an upload as named float32 tensors of a shape fixed by the config (`view`), how to put such
tensors back into the method's payload (`rebuild`), and how many values that is (`dimension`).
The server must need only the mean of the views, so that clipping each view to norm C bounds the
sum's sensitivity (2C under replace-one). privacy.py and secagg.py know nothing else of a method.
"""

from __future__ import annotations

from typing import Any

import torch

from thinwire.wire import Payload


class UpdateSpace:
    """The upload's tensors themselves (a weight delta, a LoRA delta): the default space."""

    def __init__(self, description: str):
        self.description = description

    def view(self, payload: Payload) -> dict[str, torch.Tensor]:
        return {name: t.float() for name, t in payload.tensors.items()}

    def rebuild(self, payload: Payload, view: dict[str, torch.Tensor]) -> Payload:
        """`payload` with its update replaced by `view` (in the payload's own dtypes)."""
        return Payload(tensors={name: t.to(payload.tensors[name].dtype) for name, t in view.items()},
                       scalars=dict(payload.scalars))

    def dimension(self, server: Any) -> int:
        """Values in one view, as the server knows them."""
        return server.trainable_parameters()
