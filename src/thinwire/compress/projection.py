"""Ferret's shared-randomness projection codec (ALGORITHMS.md §3), built for speed.

A client cuts its update Δ into blocks, and sends for block l the K_l coordinates
γ_l = V_lᵀ Δ_l / (ρ_l K_l) in a random basis V_l that nobody transmits: every party regenerates
it from shared information (run seed, round, block, basis index). The server averages
coordinates per (round, block, basis) and rebuilds Δ̃_l = V_l γ̄_l, which is unbiased:
E[V Vᵀ] = ρ K I.

What makes it fast (the released code spends nearly all its time regenerating bases):

* a cheap generator: the fast bases are a discrete uniform on a symmetric 2^16-point grid over
  (−1/√d, 1/√d) (``dist="uniform"``, the default; 2^8 points with ``"uniform8"``), i.e. raw
  64-bit words from the seeded ``torch.Generator`` viewed as int16 (int8) lanes: 4 (8) entries
  per generator step instead of one, and no ``erfinv``. The paper's N(0,1) truncated to
  [−1/√d, 1/√d] has variance (1 − 2/(15d))/(3d), the uniform 1/(3d): a relative difference of
  2/(15d) ≤ 2.3e-4 at d = 576 (measured in benchmarks/ferret_codec.py); ρ below is always the
  exact variance of what is drawn, so the reconstruction stays unbiased. ``"trunc_normal"``
  draws the paper's distribution (``torch.nn.init.trunc_normal_``, ~10× slower). ``"sign"``
  (structured option) draws ±1/√(3d) from single bits: same ρ as the uniform, kurtosis 1 instead
  of 1.8, so its error is the same up to O(1/d) (measured in the benchmark);
* only bases with a non-zero coordinate are generated, each once per round on the server
  (coordinates of all clients are aggregated before reconstruction);
* generation is streamed in cache-sized chunks (never a [K, d] matrix) and spread over threads.

Seeds (the basis definition, shared by everyone). The flat vector of block l is cut on a fixed
grid of ``GRID`` elements; entries [c·GRID, (c+1)·GRID) of basis j of block l in round r come
from a fresh ``torch.Generator`` seeded with ``fmix32(key_r + n)`` (mod 2^32), where
``key_r = derive_seed(run_seed, "ferret-bases", r)`` and
``n = k_max·Σ_{l'<l} chunks(l') + j·chunks(l) + c`` enumerates (block, basis, chunk) densely.
fmix32 is a bijection and the enumeration is injective, so within a round no two chunks share a
seed (torch's CPU mt19937 uses only 32 seed bits: hashing into 32 bits would collide). Bases are
fresh every round; pass a constant ``round_idx`` to get the released code's fixed run-wide pool.
Every client of a round uses the same sequence of bases for a block; a client with K_l
coordinates uses its first K_l. Because the grid is fixed, any chunking of the work (threads,
tiles) yields the same bits.

Determinism: reconstruction only multiplies exactly representable grid values by a float32
coefficient and adds, as separate IEEE operations on ≤ GRID elements in a fixed order (bases in
ascending j per chunk), so it is bit-identical across processes and thread counts, and across
machines with the same torch. Projection uses single-threaded BLAS products: deterministic on a
machine; its bits never need to match anywhere else (the coordinates are what is sent).
Generation happens on the CPU in float32 whatever the tensors' device, so a CUDA server and a CPU
client agree; inputs are copied to the CPU per block, outputs are CPU float32.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from thinwire.seeding import derive_seed

__all__ = [
    "GRID",
    "Block",
    "BlockCodec",
    "ProjectionCodec",
    "aggregate",
    "allocate",
    "block_norms",
    "pack",
    "partition_blocks",
    "unpack",
]

GRID = 32768
"""Elements per generator chunk: part of the basis definition (changing it changes the bases).
2^15 float32 = 128 KiB, so a chunk, its Δ slice and its output stay in L2, while the per-chunk
costs (a generator seeding, a few Python calls) stay under ~10% of drawing the chunk."""

_M32 = 0xFFFFFFFF
_DISTS = ("uniform", "uniform8", "sign", "trunc_normal")
_LANES = {"uniform": 4, "uniform8": 8, "sign": 64, "trunc_normal": 0}  # entries per 64-bit draw
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A group of whole tensors projected together: index l, members in order, size d_l."""

    index: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    size: int

    @property
    def n_chunks(self) -> int:
        """Generator chunks on the fixed grid."""
        return -(-self.size // GRID)

    def spans(self) -> list[tuple[str, int, int]]:
        """(name, start, stop) of each member in the block's flat vector."""
        out, start = [], 0
        for name, shape in zip(self.names, self.shapes):
            stop = start + math.prod(shape)
            out.append((name, start, stop))
            start = stop
        return out

    def gather(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The block's members flattened into one CPU float32 vector (a view when possible)."""
        parts = [tensors[n].detach().reshape(-1).to("cpu", torch.float32) for n in self.names]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `flat` shaped like the members."""
        return {n: flat[a:b].view(s) for (n, a, b), s in zip(self.spans(), self.shapes)}


def partition_blocks(named_shapes: Sequence[tuple[str, Sequence[int]]], rule: str = "code") -> list[Block]:
    """Cut an ordered list of (unique) parameters into blocks.

    Why several rules: the block layout fixes the allocation granularity and the bases.
    - ``"code"``: the released Ferret code's rule, exactly: walk the tensors in order, appending
      to the current group, and close it before a tensor that would push it past
      int(0.9·median(numel)). Weight matrices larger than that are alone; smaller neighbours are
      packed. On Llama-style models every matrix is its own block and the two norms of a layer
      (plus the final norm, for the last layer) form one small block — this gives the paper's
      L = 194 for a 24-layer 1.3B Llama. With grouped-query attention k_proj and v_proj are
      smaller than the target and end up in one block (SmolLM2-135M: 211 blocks).
    - ``"matrix"``: every ≥2-D tensor is its own block; a 1-D tensor (norm, bias) joins the block
      before it (the first block if none precedes).
    - ``"tensor"``: every tensor is its own block.
    - ``"layer"``: one block per transformer layer (names matching ``layers.<i>.``); tensors
      outside layers follow the ``"matrix"`` rule.
    Tied parameters must be passed once.
    """
    items = [(str(n), tuple(int(x) for x in s)) for n, s in named_shapes]
    if not items:
        return []
    if len({n for n, _ in items}) != len(items):
        raise ValueError("partition_blocks: duplicate tensor names (pass tied parameters once)")
    groups: list[list[tuple[str, tuple[int, ...]]]] = []
    if rule == "code":
        target = int(0.9 * float(np.median([math.prod(s) for _, s in items])))
        cur: list[tuple[str, tuple[int, ...]]] = []
        cur_dim = 0
        for n, s in items:
            numel = math.prod(s)
            if cur_dim + numel > target and cur:
                groups.append(cur)
                cur, cur_dim = [], 0
            cur.append((n, s))
            cur_dim += numel
        if cur:
            groups.append(cur)
    elif rule == "tensor":
        groups = [[it] for it in items]
    elif rule in ("matrix", "layer"):
        pending: list[tuple[str, tuple[int, ...]]] = []  # 1-D tensors seen before any block
        last_key: object = None
        for n, s in items:
            m = _LAYER_RE.search(n) if rule == "layer" else None
            if m is not None:
                key: object = ("layer", int(m.group(1)))
                if groups and key == last_key:
                    groups[-1].append((n, s))
                else:
                    groups.append([*pending, (n, s)])
                    pending = []
                last_key = key
            elif len(s) >= 2:
                groups.append([*pending, (n, s)])
                pending, last_key = [], ("tensor", n)
            elif groups:
                groups[-1].append((n, s))
            else:
                pending.append((n, s))
        if pending:
            groups.append(pending)
    else:
        raise ValueError(f"partition_blocks: unknown rule {rule!r} (use code, matrix, tensor or layer)")
    return [
        Block(i, tuple(n for n, _ in g), tuple(s for _, s in g), sum(math.prod(s) for _, s in g))
        for i, g in enumerate(groups)
    ]


def block_norms(blocks: Sequence[Block], tensors: Mapping[str, torch.Tensor]) -> list[float]:
    """‖Δ_l‖ per block (float64), the input of `allocate`."""
    out = []
    for b in blocks:
        sq = sum(float(tensors[n].detach().double().square().sum()) for n in b.names)
        out.append(math.sqrt(sq))
    return out


def allocate(
    block_norms: Sequence[float],
    k_max: int = 200,
    k_min: int = 2,
    rule: str = "code",
    budget: int | None = None,
) -> list[int]:
    """Number of coordinates K_l per block, ∝ ‖Δ_l‖ (the paper's rule).

    - ``"code"`` (released code): K_l = max(⌊(‖Δ_l‖/max_j ‖Δ_j‖)·k_max⌋, k_min).
    - ``"proportional"``: K_l ∝ ‖Δ_l‖ with Σ K_l = `budget` exactly (when
      k_min·#nonzero ≤ budget ≤ k_max·#nonzero; otherwise clamped): water-filling,
      K_l = clamp(λ‖Δ_l‖, k_min, k_max) with the level λ found by bisection, then rounding by
      largest remainder, ties to the lower block index.
    Blocks with ‖Δ_l‖ = 0 get 0 coordinates in both rules (the released code sends k_min
    zeros; they carry no information). A non-finite norm is an error (a diverged client).
    k_max also caps the basis sequence of each block (`ProjectionCodec.k_max`).
    """
    norms = [float(x) for x in block_norms]
    if any(not math.isfinite(x) or x < 0 for x in norms):
        raise ValueError("allocate: block norms must be finite and non-negative (the update diverged?)")
    if not 0 <= k_min <= k_max:
        raise ValueError(f"allocate: need 0 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    top = max(norms, default=0.0)
    if top == 0.0:
        return [0] * len(norms)
    if rule == "code":
        return [0 if x == 0.0 else max(int(x / top * k_max), k_min) for x in norms]
    if rule != "proportional":
        raise ValueError(f"allocate: unknown rule {rule!r} (use code or proportional)")
    if budget is None or budget < 0:
        raise ValueError("allocate: rule 'proportional' needs a budget >= 0 (total coordinates)")
    live = [i for i, x in enumerate(norms) if x > 0.0]
    budget = min(max(budget, k_min * len(live)), k_max * len(live))

    def share(lam: float) -> dict[int, float]:  # water level λ: K_l = clamp(λ‖Δ_l‖, k_min, k_max)
        return {i: min(max(lam * norms[i], k_min), k_max) for i in live}

    lo, hi = 0.0, k_max / min(norms[i] for i in live)  # Σ share(hi) = k_max·#live ≥ budget
    for _ in range(200):  # bisection on a monotone sum
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(share(mid).values()) < budget else (lo, mid)
    x = share(hi)
    k = [0] * len(norms)
    for i, v in x.items():
        k[i] = math.floor(v + 1e-9)
    rest = budget - sum(k)
    for i in sorted(live, key=lambda i: (-(x[i] - k[i]), i)):  # largest remainder, ties to lower index
        if rest <= 0:
            break
        if k[i] < k_max:
            k[i] += 1
            rest -= 1
    return k


# --------------------------------------------------------------------------------------------
# Coordinates: aggregation and wire packing
# --------------------------------------------------------------------------------------------


def aggregate(
    client_coords: Sequence[Sequence[torch.Tensor]], weights: Sequence[float] | None = None
) -> list[torch.Tensor]:
    """Weighted mean of several clients' coordinates per (block, basis), zero-padded.

    Why before reconstruction: V γ̄ = Σ_i w_i V γ_i, so averaging coordinates gives the weighted
    mean of the clients' reconstructions while generating each basis once. `weights` (example
    counts or None for equal) are normalised to sum 1; sums run in float64 in the given client
    order (sort clients by id for a deterministic result).
    """
    if not client_coords:
        raise ValueError("aggregate: no clients")
    n_blocks = len(client_coords[0])
    if any(len(c) != n_blocks for c in client_coords):
        raise ValueError("aggregate: clients disagree on the number of blocks")
    w = [1.0] * len(client_coords) if weights is None else [float(x) for x in weights]
    if len(w) != len(client_coords) or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError("aggregate: need one finite, non-negative weight per client, not all zero")
    tot = math.fsum(w)
    w = [x / tot for x in w]
    out = []
    for l in range(n_blocks):
        k = max(int(c[l].numel()) for c in client_coords)
        acc = torch.zeros(k, dtype=torch.float64)
        for c, wi in zip(client_coords, w):
            g = c[l].detach().reshape(-1).to("cpu", torch.float64)
            acc[: g.numel()].add_(g * wi)
        out.append(acc.float())
    return out


def pack(coords: Sequence[torch.Tensor], dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, counts) for the wire: all coordinates concatenated, and K_l per block (int32).

    Positions are implicit: a client's K_l coordinates are bases 0..K_l−1 of block l.
    """
    counts = torch.tensor([int(c.numel()) for c in coords], dtype=torch.int32)
    vals = torch.cat([c.detach().reshape(-1).float() for c in coords]) if coords else torch.zeros(0)
    return vals.to(dtype), counts


def unpack(values: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of `pack` (float32 coordinates per block)."""
    sizes = [int(x) for x in counts.tolist()]
    if any(s < 0 for s in sizes) or sum(sizes) != values.numel():
        raise ValueError("unpack: counts do not match the number of values")
    return [t.float() for t in torch.split(values.reshape(-1), sizes)]


# --------------------------------------------------------------------------------------------
# Seeds and generation
# --------------------------------------------------------------------------------------------


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, a bijection on uint32 (vectorised, wraps mod 2^64)."""
    h = h.astype(np.uint64) & np.uint64(_M32)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(_M32)
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(_M32)
    h ^= h >> np.uint64(16)
    return h


class _Worker(threading.local):
    """Per-thread generator and scratch buffers (a Generator is not thread-safe)."""

    def __init__(self) -> None:
        self.gen = torch.Generator(device="cpu")
        self.raw = torch.empty(GRID // 4, dtype=torch.int64)
        self.row = torch.empty(GRID, dtype=torch.float32)
        self.tmp = torch.empty(GRID, dtype=torch.float32)
        self.tile = torch.empty(_TILE, GRID, dtype=torch.float32)
        self.bits = torch.empty(GRID // 8, 8, dtype=torch.float32)


_TILE = 8  # bases per projection matrix product: 8 × GRID float32 = 1 MiB, an L2's worth
# _BITS[byte, i] = bit i of byte: entry 8g + i of a chunk is bit i of byte g (8 floats per lookup)
_BITS = torch.arange(256, dtype=torch.uint8).unsqueeze(1).bitwise_right_shift(_SHIFTS).bitwise_and(1).float()
_WORKER = _Worker()


@contextmanager
def _workers(threads: int) -> Iterator[tuple[ThreadPoolExecutor | None, int]]:
    """Our thread pool, with torch ops single-threaded inside the codec; yields (pool, saved).

    Why: nested thread teams (ours × ATen/MKL's) oversubscribe the cores, and a BLAS dot whose
    thread team waits on a descheduled thread was measured 20× slower on a busy 2-core box. We
    set one intra-op thread, start the workers (a barrier makes each initialise torch's
    per-thread setting while it is 1) and restore the caller's setting on exit. `saved` lets a
    generator hand the caller its threads back while it is suspended.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = None
    try:
        if threads > 1:
            pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="thinwire-proj")
            barrier = threading.Barrier(threads)

            def warm() -> None:
                torch.get_num_threads()  # torch reads the (now 1) setting once per thread
                barrier.wait()

            for f in [pool.submit(warm) for _ in range(threads)]:
                f.result()
        yield pool, saved
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(saved)


def _ordered_map(fn: Callable, items: Iterable, pool: ThreadPoolExecutor | None, depth: int = 4) -> Iterator:
    """fn over items, results in input order, at most `depth` in flight (bounded memory)."""
    if pool is None:
        for x in items:
            yield fn(x)
        return
    pending: deque = deque()
    it = iter(items)
    for x in it:
        pending.append(pool.submit(fn, x))
        if len(pending) >= depth:
            break
    while pending:
        res = pending.popleft().result()
        for x in it:
            pending.append(pool.submit(fn, x))
            break
        yield res


class BlockCodec:
    """What every Ferret basis shares: blocks, the run seed, k_max (the basis sequence's length per
    block and round) and the worker threads; subclasses define the bases. Holds no tensors."""

    def __init__(self, blocks: Sequence[Block], run_seed: int, *, k_max: int = 200, threads: int | None = None) -> None:
        name = type(self).__name__
        if k_max < 1:
            raise ValueError(f"{name}: k_max must be >= 1")
        self.blocks = list(blocks)
        if [b.index for b in self.blocks] != list(range(len(self.blocks))):
            raise ValueError(f"{name}: blocks must be indexed 0..L-1 in order")
        self.run_seed = int(run_seed)
        self.k_max = int(k_max)
        if threads is None:
            threads = min(torch.get_num_threads(), os.cpu_count() or 1)
        self.threads = max(1, int(threads))

    def _check_ks(self, ks: Sequence[int], scaling: str) -> None:
        if scaling not in ("unbiased", "code"):
            raise ValueError(f"project: unknown scaling {scaling!r} (use unbiased or code)")
        if len(ks) != len(self.blocks) or any(not 0 <= int(k) <= self.k_max for k in ks):
            raise ValueError(f"project: need one K_l in [0, {self.k_max}] per block")

    def _check_coords(self, coords: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Coordinates per block as CPU float64, checked for count and finiteness."""
        if len(coords) != len(self.blocks):
            raise ValueError(f"reconstruct: expected {len(self.blocks)} coordinate vectors, got {len(coords)}")
        out = []
        for blk, g in zip(self.blocks, coords):
            g = g.detach().reshape(-1).to("cpu", torch.float64)
            if g.numel() > self.k_max:
                raise ValueError(f"reconstruct: block {blk.index} has {g.numel()} coordinates > k_max {self.k_max}")
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"reconstruct: non-finite coordinates in block {blk.index}")
            out.append(g)
        return out

    def iter_reconstruct(
        self, coords: Sequence[torch.Tensor], round_idx: int, *, clip: float | None = None
    ) -> Iterator[tuple[Block, torch.Tensor]]:
        raise NotImplementedError

    def reconstruct(
        self, coords: Sequence[torch.Tensor], round_idx: int, *, clip: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Δ̃ as a dict name → CPU float32 tensor (all blocks; see `iter_reconstruct` to stream)."""
        out: dict[str, torch.Tensor] = {}
        for blk, flat in self.iter_reconstruct(coords, round_idx, clip=clip):
            out.update(blk.split(flat))
        return out


class ProjectionCodec(BlockCodec):
    """Ferret's block-wise random projection over a fixed list of parameters.

    Everything both sides must agree on lives here: the blocks, `run_seed`, `k_max` (the length
    of each block's basis sequence per round; it fixes the seed layout) and `dist`. Cheap to
    build; holds no tensors.
    """

    def __init__(
        self,
        blocks: Sequence[Block],
        run_seed: int,
        *,
        k_max: int = 200,
        dist: str = "uniform",
        threads: int | None = None,
    ) -> None:
        if dist not in _DISTS:
            raise ValueError(f"ProjectionCodec: unknown dist {dist!r} (use {', '.join(_DISTS)})")
        super().__init__(blocks, run_seed, k_max=k_max, threads=threads)
        self.dist = dist
        offsets, acc = [], 0
        for b in self.blocks:
            offsets.append(acc)
            acc += self.k_max * b.n_chunks
        if acc >= 2**32:
            raise ValueError("ProjectionCodec: too many (block, basis, chunk) seeds for 32-bit seeding; lower k_max")
        self._offsets = offsets
        self._lanes = _LANES[dist]
        self._levels = {"uniform": 2**16, "uniform8": 2**8, "sign": 2}.get(dist)  # None: trunc_normal

    # ---- the distribution ---------------------------------------------------------------------

    def rho(self, block: int) -> float:
        """Per-entry variance ρ_l of the bases actually drawn (makes 1/(ρK) unbiased)."""
        d = self.blocks[block].size
        if self.dist == "trunc_normal":  # N(0,1) truncated to ±1/√d: series, exact to O(d⁻³)
            return (1.0 - 2.0 / (15.0 * d)) / (3.0 * d)
        if self.dist == "sign":  # ±1/√(3d): the uniform's variance, so "code" scaling means the same
            return 1.0 / (3.0 * d)
        n = self._levels  # symmetric grid (m + ½)·(2b/n), m uniform on n integers: var = b²(1 − n⁻²)/3
        return (1.0 - 1.0 / (n * n)) / (3.0 * d)

    def _scale(self, block: int) -> tuple[float, float]:
        """(scale, offset): basis entries are scale·(raw + offset), raw as generated (exact)."""
        d = self.blocks[block].size
        if self.dist == "trunc_normal":
            return 1.0, 0.0
        if self.dist == "sign":  # raw bit s ∈ {0, 1} → (2s − 1)/√(3d)
            return 2.0 / math.sqrt(3.0 * d), -0.5
        return 2.0 / (math.sqrt(d) * self._levels), 0.5

    def seeds(self, round_idx: int, block: int, js: Sequence[int] | np.ndarray, chunk: int) -> list[int]:
        """32-bit generator seeds of chunk `chunk` of bases `js` of `block` in round `round_idx`."""
        blk = self.blocks[block]
        js = np.asarray(js, dtype=np.uint64)
        if js.size and int(js.max()) >= self.k_max:
            raise ValueError(f"basis index >= k_max ({self.k_max})")
        key = derive_seed(self.run_seed, "ferret-bases", int(round_idx)) & _M32
        ctr = np.uint64(self._offsets[block] + chunk) + js * np.uint64(blk.n_chunks)
        return [int(s) for s in _fmix32(ctr + np.uint64(key))]

    def _raw(self, seed: int, n: int, bound: float) -> torch.Tensor:
        """Raw entries of one chunk (exact values: grid integers m, or trunc-normal floats).

        The grid draws take 64-bit words from the generator and view them as int16/int8 lanes:
        4 or 8 entries per generator step (little-endian byte order).
        """
        w = _WORKER
        w.gen.manual_seed(seed)
        lanes = self._lanes
        if not lanes:
            return torch.nn.init.trunc_normal_(w.row[:n], 0.0, 1.0, -bound, bound, generator=w.gen)
        raw = w.raw[: -(-n // lanes)]
        raw.random_(-(2**63), None, generator=w.gen)
        if lanes == 64:  # one bit per entry: a byte → 8 floats table lookup (2.5× faster than shifts)
            n8 = -(-n // 8)
            bits = torch.index_select(_BITS, 0, raw.view(torch.uint8)[:n8].long(), out=w.bits[:n8])
            return bits.view(-1)[:n]
        return raw.view(torch.int16 if lanes == 4 else torch.int8)[:n]

    def basis(
        self, round_idx: int, block: int, j0: int, j1: int, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Bases j0..j1−1 of a block, entries [start, stop), materialised as a [j, n] float32 tensor.

        For tests and small blocks; the codec itself never materialises more than a chunk.
        """
        blk = self.blocks[block]
        stop = blk.size if stop is None else stop
        scale, off = self._scale(block)
        b = 1.0 / math.sqrt(blk.size)
        out = torch.empty(j1 - j0, stop - start)
        c0, c1 = start // GRID, -(-stop // GRID)
        for c in range(c0, c1):
            a, e = c * GRID, min((c + 1) * GRID, blk.size)
            lo, hi = max(a, start), min(e, stop)
            for i, s in enumerate(self.seeds(round_idx, block, range(j0, j1), c)):
                row = self._raw(s, e - a, b).float()
                out[i, lo - start : hi - start] = (row[lo - a : hi - a] + off) * scale
        return out

    # ---- client side ------------------------------------------------------------------------

    def project(
        self,
        delta: Mapping[str, torch.Tensor],
        round_idx: int,
        ks: Sequence[int],
        *,
        scaling: str = "unbiased",
    ) -> list[torch.Tensor]:
        """Coordinates γ_l (float32, length K_l) of Δ on the first K_l bases of each block.

        scaling "unbiased": γ = VᵀΔ/(ρ K), so E[Vγ] = Δ. "code": the released code's d/K, whose
        reconstruction is ≈ Δ/3 (absorbed by the server learning rate).
        """
        self._check_ks(ks, scaling)
        partial: dict[int, list] = {}

        def units():
            for blk, k in zip(self.blocks, ks):
                if k == 0:
                    continue
                flat = blk.gather(delta)
                partial[blk.index] = [None] * blk.n_chunks
                for c in range(blk.n_chunks):
                    yield blk.index, int(k), c, flat[c * GRID : (c + 1) * GRID]

        def run(u):
            l, k, c, dc = u
            b = 1.0 / math.sqrt(self.blocks[l].size)
            _, off = self._scale(l)
            n = dc.numel()
            tile = _WORKER.tile[:, :n]
            res = torch.empty(k, dtype=torch.float64)
            seeds = self.seeds(round_idx, l, range(k), c)
            for t0 in range(0, k, _TILE):
                rows = seeds[t0 : t0 + _TILE]
                for i, s in enumerate(rows):
                    tile[i].copy_(self._raw(s, n, b))
                res[t0 : t0 + len(rows)] = torch.mv(tile[: len(rows)], dc)
            if off:  # Σ(m + ½)Δ = Σ mΔ + ½ΣΔ
                res += off * float(dc.double().sum())
            return l, c, res

        with _workers(self.threads) as (pool, _):
            for l, c, res in _ordered_map(run, units(), pool, 2 * self.threads):
                partial[l][c] = res
        out = []
        for blk, k in zip(self.blocks, ks):
            if k == 0:
                out.append(torch.zeros(0))
                continue
            acc = torch.zeros(int(k), dtype=torch.float64)
            for r in partial.pop(blk.index):
                acc += r
            scale, _ = self._scale(blk.index)
            norm = 1.0 / (self.rho(blk.index) * k) if scaling == "unbiased" else blk.size / k
            out.append((acc * (scale * norm)).float())
        return out

    # ---- server side (and catching-up clients) -------------------------------------------------

    def iter_reconstruct(
        self, coords: Sequence[torch.Tensor], round_idx: int, *, clip: float | None = None
    ) -> Iterator[tuple[Block, torch.Tensor]]:
        """Yield (block, Δ̃_l flat float32) block by block: Δ̃_l = Σ_j γ_j v_j.

        Streaming keeps memory at a few blocks; apply each piece to the weights as it comes.
        Only bases with γ_j ≠ 0 are generated. `clip` (released code: 10) scales each piece
        γ_j v_j down to norm ≤ clip, as the released server does per (seed, block).
        """
        plans: list[tuple[list[int], list[float], float]] = []
        for blk, g in zip(self.blocks, self._check_coords(coords)):
            js = [j for j, x in enumerate(g.tolist()) if x != 0.0]
            gam = [float(g[j]) for j in js]
            if clip is not None and js:
                gam = self._clip(round_idx, blk.index, js, gam, float(clip))
            scale, off = self._scale(blk.index)
            coef = [float(np.float32(x * scale)) for x in gam]
            # the "+ offset" part of every entry, summed once per block (exact in float64 order)
            plans.append((js, coef, float(np.float32(off * math.fsum(coef)))))

        bufs: dict[int, torch.Tensor] = {}

        def units():
            for blk, (js, _, _) in zip(self.blocks, plans):
                if not js:
                    continue
                bufs[blk.index] = torch.zeros(blk.size)
                for c in range(blk.n_chunks):
                    yield blk.index, c

        def run(u):
            l, c = u
            js, coef, add = plans[l]
            out = bufs[l][c * GRID : (c + 1) * GRID]
            n = out.numel()
            b = 1.0 / math.sqrt(self.blocks[l].size)
            tmp = _WORKER.tmp[:n]
            for s, a in zip(self.seeds(round_idx, l, js, c), coef):
                torch.mul(self._raw(s, n, b), a, out=tmp)  # exact m times float32 a: one rounding
                out.add_(tmp)  # one rounding, fixed order: thread- and chunking-invariant
            if add:
                out.add_(add)
            return l, c

        nxt = 0
        done: dict[int, int] = {}
        ready: list[tuple[Block, torch.Tensor]] = []
        with _workers(self.threads) as (pool, saved):
            for l, _c in _ordered_map(run, units(), pool, 2 * self.threads):
                done[l] = done.get(l, 0) + 1
                while nxt < len(self.blocks) and (not plans[nxt][0] or done.get(nxt) == self.blocks[nxt].n_chunks):
                    blk = self.blocks[nxt]
                    ready.append((blk, bufs.pop(nxt) if plans[nxt][0] else torch.zeros(blk.size)))
                    nxt += 1
                while ready:  # the caller's code runs with the caller's thread setting
                    torch.set_num_threads(saved)
                    try:
                        yield ready.pop(0)
                    finally:
                        torch.set_num_threads(1)
        for blk in self.blocks[nxt:]:  # trailing blocks with nothing to generate
            yield blk, torch.zeros(blk.size)

    def _clip(self, round_idx: int, block: int, js: list[int], gam: list[float], clip: float) -> list[float]:
        """Scale γ_j so that ‖γ_j v_j‖ ≤ clip; ‖v_j‖ < 1 always, so only |γ_j| > clip needs ‖v_j‖."""
        cand = [i for i, x in enumerate(gam) if abs(x) > clip]
        if not cand:
            return gam
        blk = self.blocks[block]
        b = 1.0 / math.sqrt(blk.size)
        scale, off = self._scale(block)
        cj = [js[i] for i in cand]

        def run(c):
            n = min(GRID, blk.size - c * GRID)
            res = []
            for s in self.seeds(round_idx, block, cj, c):
                row = self._raw(s, n, b)
                if self._levels is None:  # exact, order-free sum of squares
                    res.append(math.fsum(row.double().square().tolist()))
                else:  # grid values m ± ½: Σ(m ± ½)² = Σ(m² ± m) + n/4, exact in int64
                    m = row.to(torch.int64)
                    res.append(int((m * m + m).sum()) if off > 0 else int((m * m - m).sum()))
            return res

        sums: list[list] = [[] for _ in cj]
        with _workers(self.threads) as (pool, _):
            for res in _ordered_map(run, range(blk.n_chunks), pool, 2 * self.threads):
                for i, v in enumerate(res):
                    sums[i].append(v)
        out = list(gam)
        for i, parts in zip(cand, sums):
            if self._levels is None:
                norm = math.sqrt(math.fsum(parts))
            else:
                norm = scale * math.sqrt(sum(parts) + blk.size / 4)
            total = abs(gam[i]) * norm
            coef = clip / (total + 1e-8)
            if coef < 1.0:
                out[i] = gam[i] * coef
        return out
