"""Secret randomness: keys from the operating system, streams from ChaCha20.

DP noise and SecAgg+ masks must be unpredictable to whoever holds a run's published files, so
they never come from the run seed (which every client receives and config.toml records). A key
is 256 bits of OS entropy; a stream is ChaCha20 under a subkey derived from the key and the
stream's labels (keyed BLAKE2b), so one key serves every (round, client) without storing more,
and a checkpoint that keeps the key resumes every stream bit-exactly.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
CHUNK = 1 << 22  # values per keystream request: bounds the temporary memory of a large draw


def new_key() -> bytes:
    """256 bits from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def keystream(key: bytes, *labels: object):
    """The ChaCha20 keystream (key, labels): `.update(zeros)` returns its next bytes."""
    return _cipher(key, labels)


def _cipher(key: bytes, labels: tuple[object, ...]):
    if len(key) < 16:
        raise ValueError(f"a stream key needs at least 128 bits, got {8 * len(key)}")
    subkey = hashlib.blake2b("\x1f".join(map(str, labels)).encode(), key=key[:64], digest_size=32).digest()
    return Cipher(algorithms.ChaCha20(subkey, bytes(16)), mode=None).encryptor()


def normal(key: bytes, shape: tuple[int, ...] | torch.Size, *labels: object) -> torch.Tensor:
    """Standard normal float32 values from the stream (key, labels): Box-Muller over 53-bit uniforms,
    so the tails reach past 8 standard deviations."""
    count = int(np.prod(shape, dtype=np.int64))
    out = np.empty(count, dtype=np.float32)
    cipher = _cipher(key, labels)
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        pairs = (n + 1) // 2
        raw = np.frombuffer(cipher.update(bytes(16 * pairs)), dtype=np.uint64).reshape(pairs, 2) >> np.uint64(11)
        u1 = (raw[:, 0].astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]: the log is finite
        angle = raw[:, 1].astype(np.float64) * (2.0 * np.pi * 2.0 ** -53)
        radius = np.sqrt(-2.0 * np.log(u1))
        both = np.empty(2 * pairs, dtype=np.float64)
        both[0::2], both[1::2] = radius * np.cos(angle), radius * np.sin(angle)
        out[start:start + n] = both[:n]
    return torch.from_numpy(out).reshape(tuple(shape))


def key_tensor(key: bytes) -> torch.Tensor:
    """A key as a uint8 tensor, for a checkpoint or a client's state."""
    return torch.frombuffer(bytearray(key), dtype=torch.uint8)


def key_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.numpy().tobytes()
