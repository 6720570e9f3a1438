"""Every random choice derives from the run seed through a stable hash of named keys.

Python's `hash()` is salted per process, so keys are hashed with BLAKE2b: the same
(seed, keys) gives the same stream on every machine and in every process.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for the stream named by `keys` under the run seed."""
    text = "\x1f".join([str(seed), *map(str, keys)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def torch_generator(seed: int, *keys: object) -> torch.Generator:
    """An explicitly seeded CPU generator (never the global RNG)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
