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


def random_fingerprint() -> str:
    """SHA-256 of fixed-seed draws through torch's CPU kernels (normal, uniform, randint, randperm),
    long enough to take their vectorised paths. Machines whose kernels differ (ATen's DEFAULT vs
    AVX2 capability changes normal_'s last bits) draw different bases and perturbations from the
    same seeds, so replicas rebuilt from seeds would drift apart: parties compare this at handshake.
    """
    gen = torch.Generator(device="cpu")
    digest = hashlib.sha256()
    for draw in (lambda n: torch.empty(n).normal_(generator=gen), lambda n: torch.empty(n).uniform_(generator=gen),
                 lambda n: torch.randint(1 << 30, (n,), generator=gen), lambda n: torch.randperm(n, generator=gen)):
        gen.manual_seed(12345)
        digest.update(draw(3 * (1 << 15) + 17).numpy().tobytes())
    return digest.hexdigest()
