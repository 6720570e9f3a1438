"""Zeroth-order (MeZO/SPSA-style) core for FedKSeed and FedKSeed-Pro.

Everything here works on seeds and scalars, never on stored directions:

* A direction ``z`` for pool seed ``s`` is regenerated on demand, tensor by tensor and block by
  block, from an explicitly seeded CPU ``torch.Generator`` in float32 (see `direction`).
* `zo_estimate` computes ``g = (L(w + eps z) - L(w - eps z)) / (2 eps)``. The perturbation is
  applied lazily by forward hooks, one module at a time, to a perturbed *copy* of that module's
  weights; the original tensor is kept and put back afterwards, so restoring is exact (bit
  identical) and the extra memory is one weight tensor, not a model copy.
* `apply_seed_scalars` does ``w <- w - lr * sum_s G_s z_s`` in a fixed, documented order, so every
  party that applies the same scalars gets the same bits.
* `zo_step` is one local step: z drawn once (`draw_directions`) serves both forwards and the
  update, with the bits `apply_seed_scalars` would give for that one seed.
* `SeedHistory` turns the per-seed |g| history into FedKSeed-Pro sampling probabilities.

Determinism contract (what "the same z" means): the bits of z depend only on (pool seed, tensor
index in the parameter list, block index), with blocks of `BLOCK` elements of the flattened tensor.
They do not depend on thread count, chunking, device or call order. They do depend on the torch
CPU kernel that draws normals: ``torch.Tensor.normal_`` uses a vectorised Box-Muller whose last
bits differ between ATen CPU capabilities (``DEFAULT`` vs ``AVX2``/``AVX512``; differences are
~1e-6 absolute). Same machine type and torch build -> identical z; parties on different hardware
should compare `direction_fingerprint()` at handshake (or all set ``ATEN_CPU_CAPABILITY``).
torch's CPU mt19937 takes a 32-bit seed, so block streams are hashed into 2**32 seeds; the rare
collision makes two 32K-element blocks of different directions equal, which is harmless.

Memory: a ZO estimate costs inference memory plus a perturbed copy of the tensors in use; a tied
embedding stays perturbed for the whole forward, so the extra is about the largest weight tensor
(+108 MiB on a 513 MiB SmolLM2-135M, see benchmarks/fedkseed_rebuild.py). A local step
(`zo_step`) also keeps its z, 4 bytes per trained weight, so that it draws z once instead of three
times (benchmarks/zo_step.py measures the step against its floor, two forward passes).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

BLOCK = 1 << 15
"""Elements per independently seeded z block. Part of the direction's definition (changing it
changes every z). 32768 is the largest size at which torch's elementwise CPU kernels stay
single-threaded (ATen GRAIN_SIZE), so worker threads never oversubscribe the cores."""

_M64 = (1 << 64) - 1

Batch = Any
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
Scalars = Mapping[int, float] | torch.Tensor


# --------------------------------------------------------------------------- seeds and directions


def _splitmix64(x: int) -> int:
    """Stable 64-bit mixer (Python ints), so seeds never depend on Python's salted hash()."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _tensor_key(seed: int, tensor_index: int) -> int:
    return _splitmix64(_splitmix64(seed & _M64) ^ tensor_index)


def _block_seed(tensor_key: int, block_index: int) -> int:
    # torch's CPU mt19937 only uses the low 32 bits of its seed: make that explicit.
    return _splitmix64(tensor_key ^ block_index) & 0xFFFFFFFF


@dataclass(frozen=True)
class SeedPool:
    """The run-wide pool of K candidate seeds, known to every party from (size, base_seed) alone.

    Why derived rather than sampled: nothing to ship or store, and index k always maps to the
    same 64-bit seed on every machine.
    """

    size: int
    base_seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"seed pool size must be >= 1, got {self.size}")

    def seed(self, index: int) -> int:
        if not 0 <= index < self.size:
            raise IndexError(f"seed index {index} outside pool of size {self.size}")
        return _splitmix64(_splitmix64(self.base_seed & _M64) ^ index)


_tls = threading.local()


def _scratch(n: int) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """Per-thread generator and two float32 block buffers (z, accumulator)."""
    if not hasattr(_tls, "gen"):
        _tls.gen = torch.Generator(device="cpu")
        _tls.z = torch.empty(BLOCK, dtype=torch.float32)
        _tls.acc = torch.empty(BLOCK, dtype=torch.float32)
    return _tls.gen, _tls.z[:n], _tls.acc[:n]


def _fill_block(out: torch.Tensor, gen: torch.Generator, tensor_key: int,
                block: int) -> torch.Tensor:
    gen.manual_seed(_block_seed(tensor_key, block))
    return out.normal_(generator=gen)


def direction(seed: int, tensor_index: int, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """The float32 CPU direction z for one tensor. For checks and tests; the hot paths never
    materialise a whole z."""
    numel = 1
    for s in shape:
        numel *= int(s)
    z = torch.empty(numel, dtype=torch.float32)
    key = _tensor_key(seed, tensor_index)
    gen = torch.Generator(device="cpu")
    for b, start in enumerate(range(0, numel, BLOCK)):
        _fill_block(z[start : start + BLOCK], gen, key, b)
    return z.view(tuple(shape))


def direction_fingerprint(seed: int = 12345, numel: int = 3 * BLOCK + 17) -> str:
    """SHA-256 of a reference z: parties compare it at handshake to prove they draw the same z."""
    return hashlib.sha256(direction(seed, 0, (numel,)).numpy().tobytes()).hexdigest()


def zo_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters in a fixed order: unique tensors (tied weights once), in
    `named_parameters()` order. The tensor index used to seed z is the position in this list, so
    every party must build it from the same architecture."""
    return [p for _, p in model.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------- threading helpers

_executors: dict[int, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()


def _resolve_threads(threads: int | None) -> int:
    return max(1, int(threads) if threads is not None else torch.get_num_threads())


def _run(tasks: list[Callable[[], None]], threads: int) -> None:
    """Run independent tasks. Results never depend on scheduling: each task owns its output."""
    if threads <= 1 or len(tasks) <= 1:
        for t in tasks:
            t()
        return
    with _executors_lock:
        ex = _executors.get(threads)
        if ex is None:
            ex = _executors[threads] = ThreadPoolExecutor(threads, thread_name_prefix="thinwire-zo")
    for fut in [ex.submit(t) for t in tasks]:
        fut.result()


def _blocks(numel: int) -> list[tuple[int, int, int]]:
    return [(b, s, min(s + BLOCK, numel)) for b, s in enumerate(range(0, numel, BLOCK))]


def _group_blocks(blocks: list[tuple[int, int, int]],
                  threads: int) -> list[list[tuple[int, int, int]]]:
    per = max(1, -(-len(blocks) // (threads * 4)))
    return [blocks[i : i + per] for i in range(0, len(blocks), per)]


# --------------------------------------------------------------------------- perturbation


def _perturbed_copy(orig: torch.Tensor, key: int, scale: float, threads: int) -> torch.Tensor:
    """New tensor equal to orig + scale * z (computed in float32, cast to orig's dtype)."""
    src = orig.detach()
    if not src.is_contiguous():
        src = src.contiguous()
    flat_src = src.view(-1)
    numel = flat_src.numel()
    on_cpu_f32 = src.device.type == "cpu" and src.dtype == torch.float32
    out = torch.empty_like(src, memory_format=torch.contiguous_format)
    flat_out = out.view(-1)
    # Off-CPU: draw z on the CPU (same bits everywhere), ship once, one fused op on the device.
    zfull = None if on_cpu_f32 else torch.empty(numel, dtype=torch.float32)

    def task(chunk: list[tuple[int, int, int]]) -> None:
        gen, _, _ = _scratch(0)
        for b, s, e in chunk:
            if on_cpu_f32:
                z = _fill_block(_scratch(e - s)[1], gen, key, b)
                torch.add(flat_src[s:e], z, alpha=scale, out=flat_out[s:e])
            else:
                _fill_block(zfull[s:e], gen, key, b)

    _run([lambda c=c: task(c) for c in _group_blocks(_blocks(numel), threads)], threads)
    if zfull is not None:
        z_dev = zfull.to(src.device)
        flat_out.copy_(flat_src.float().add_(z_dev, alpha=scale))
    return out


def draw_directions(params: Sequence[torch.nn.Parameter], seed: int,
                    threads: int | None = None) -> list[torch.Tensor]:
    """z(seed) for every tensor, drawn once (same bits as `direction`), on each tensor's device.

    Why: a ZO step reads z three times (w + εz, w − εz, the update); drawing it once and keeping
    it costs 4 bytes per weight for the step instead of two more regenerations of d normals.
    """
    nthreads = _resolve_threads(threads)
    out, tasks = [], []
    for ti, p in enumerate(params):
        z = torch.empty(p.numel(), dtype=torch.float32)
        key = _tensor_key(seed, ti)

        def task(chunk: list[tuple[int, int, int]], z: torch.Tensor = z, key: int = key) -> None:
            gen, _, _ = _scratch(0)
            for b, s, e in chunk:
                _fill_block(z[s:e], gen, key, b)

        tasks.extend(lambda c=c, task=task: task(c) for c in _group_blocks(_blocks(z.numel()), nthreads))
        out.append(z)
    _run(tasks, nthreads)
    return [z.view(p.shape).to(p.device) for z, p in zip(out, params)]


@contextmanager
def perturbed(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], seed: int,
              scale: float, threads: int | None = None,
              directions: Sequence[torch.Tensor] | None = None) -> Iterator[None]:
    """Within the block, every forward of `model` sees ``w + scale * z(seed)`` for `params`.

    Why hooks: a module's weights are swapped for a perturbed copy just before that module runs
    and swapped back just after (the original tensor object is kept, so the restore is exact and
    free). Peak extra memory is the perturbed copy of the tensors in use, not a model copy.
    Parameters owned by several modules (tied input/output embeddings) stay perturbed until the
    block exits. Use under ``torch.no_grad()``. Caveat: a parameter read outside the forward of a
    module that owns it (e.g. ``F.linear(x, other_module.weight)``) would be seen unperturbed.
    `directions` (from `draw_directions(params, seed)`) saves regenerating z: same bits.
    """
    nthreads = _resolve_threads(threads)
    index = {id(p): i for i, p in enumerate(params)}
    owners: dict[int, int] = {}
    module_params: list[tuple[torch.nn.Module, list[torch.nn.Parameter]]] = []
    for module in model.modules():
        mine = [p for _, p in module.named_parameters(recurse=False) if id(p) in index]
        if mine:
            module_params.append((module, mine))
            for p in mine:
                owners[id(p)] = owners.get(id(p), 0) + 1
    missing = [i for i, p in enumerate(params) if id(p) not in owners]
    if missing:
        raise ValueError(f"parameters at indices {missing[:5]} are not owned by any module "
                         "of the model")

    active: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}

    def pre_hook(module: torch.nn.Module, args: Any, mine: list[torch.nn.Parameter]) -> None:
        for p in mine:
            if id(p) not in active:
                orig = p.data
                if directions is None:
                    new = _perturbed_copy(orig, _tensor_key(seed, index[id(p)]), scale, nthreads)
                else:
                    new = torch.add(orig.float(), directions[index[id(p)]], alpha=scale).to(orig.dtype)
                active[id(p)] = (p, orig)
                p.data = new

    def post_hook(module: torch.nn.Module, args: Any, output: Any,
                  mine: list[torch.nn.Parameter]) -> None:
        for p in mine:
            if owners[id(p)] == 1 and id(p) in active:
                p.data = active.pop(id(p))[1]

    handles = []
    try:
        for module, mine in module_params:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, mine=mine: pre_hook(m, a, mine)))
            handles.append(module.register_forward_hook(
                lambda m, a, o, mine=mine: post_hook(m, a, o, mine), always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for p, orig in active.values():
            p.data = orig
        active.clear()


class ZOEstimate(NamedTuple):
    g: float
    loss_plus: float
    loss_minus: float


def causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Default loss closure: the model's own mean token loss (batch carries `labels`)."""
    return model(**batch, use_cache=False).loss


@torch.no_grad()
def zo_estimate(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], seed: int,
                eps: float, batch: Batch, loss_fn: LossFn = causal_lm_loss,
                threads: int | None = None,
                directions: Sequence[torch.Tensor] | None = None) -> ZOEstimate:
    """Two-point estimate of the directional derivative along z(seed) on one mini-batch.

    The model must be deterministic across the two forwards (eval mode / no dropout). Weights are
    bit-identical before and after. Without `directions`, z is regenerated for each forward.
    """
    with perturbed(model, params, seed, eps, threads, directions):
        lp = float(loss_fn(model, batch))
    with perturbed(model, params, seed, -eps, threads, directions):
        lm = float(loss_fn(model, batch))
    return ZOEstimate((lp - lm) / (2.0 * eps), lp, lm)


@torch.no_grad()
def zo_step(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], seed: int, eps: float,
            lr: float, batch: Batch, loss_fn: LossFn = causal_lm_loss,
            threads: int | None = None) -> ZOEstimate:
    """One local ZO step, ``w <- w - lr * g * z``, drawing z once for both forwards and the update.

    Bit-identical to `zo_estimate` followed by `apply_seed_scalars(params, pool, {k: g}, lr)`:
    the same float32 products in the same order, without the two extra regenerations.
    """
    directions = draw_directions(params, seed, threads)
    est = zo_estimate(model, params, seed, eps, batch, loss_fn, threads, directions)
    g32 = float(torch.tensor(est.g, dtype=torch.float32))
    if g32 != 0.0:
        for p, z in zip(params, directions):
            step = torch.mul(z, g32)
            if p.dtype == torch.float32:
                p.data.add_(step, alpha=-float(lr))
            else:
                p.data.copy_(p.data.float().add_(step, alpha=-float(lr)))
    return est


# --------------------------------------------------------------------------- rebuild / update


def _sorted_scalars(scalars: Scalars, size: int) -> list[tuple[int, float]]:
    """(index, float32-rounded value) pairs, ascending index, zeros dropped."""
    if isinstance(scalars, torch.Tensor):
        if scalars.dim() != 1 or scalars.numel() != size:
            raise ValueError(f"dense scalars must have shape ({size},), got {tuple(scalars.shape)}")
        dense = scalars.detach().to("cpu", torch.float32)
        idx = torch.nonzero(dense).view(-1).tolist()
        vals = dense[idx].tolist()
        return list(zip(idx, vals))
    out = []
    for k in sorted(scalars):
        if not 0 <= int(k) < size:
            raise IndexError(f"seed index {k} outside pool of size {size}")
        v = float(torch.tensor(float(scalars[k]), dtype=torch.float32))
        if v != 0.0:
            out.append((int(k), v))
    return out


@torch.no_grad()
def apply_seed_scalars(params: Sequence[torch.nn.Parameter], pool: SeedPool, scalars: Scalars,
                       lr: float, threads: int | None = None) -> int:
    """In place: ``w <- w - lr * sum_s G_s * z_s``. Returns the number of seeds applied.

    Order (the bit-level contract): each G_s is rounded to float32; seeds with G_s == 0 are
    skipped; for every BLOCK of every tensor, ``acc = G_s1*z_s1`` then ``acc += G_s*z_s`` in
    ascending seed index, in float32; then ``w_block += (-lr) * acc`` (float32 params in place;
    other dtypes via float32 and a cast). Blocks are independent, so threads change speed, never
    bits: two parties applying the same scalars to the same weights get identical weights.
    Applying scalars in two calls (old, then the delta) sums in a different order than one call,
    so it is close to, not bit-equal with, the one-call result.
    """
    items = _sorted_scalars(scalars, pool.size)
    if not items:
        return 0
    nthreads = _resolve_threads(threads)
    seeds = [(pool.seed(k), v) for k, v in items]
    neg_lr = -float(lr)
    tasks: list[Callable[[], None]] = []
    copybacks: list[tuple[torch.Tensor, torch.Tensor]] = []
    for ti, p in enumerate(params):
        keys = [(_tensor_key(s, ti), v) for s, v in seeds]
        data = p.data
        work = data if data.is_contiguous() else data.contiguous()
        if work is not data:
            copybacks.append((data, work))
        flat = work.view(-1)
        direct = flat.device.type == "cpu" and flat.dtype == torch.float32

        def task(chunk: list[tuple[int, int, int]], flat: torch.Tensor = flat,
                 keys: list[tuple[int, float]] = keys, direct: bool = direct) -> None:
            gen, _, _ = _scratch(0)
            for b, s, e in chunk:
                _, z, acc = _scratch(e - s)
                for j, (key, v) in enumerate(keys):
                    _fill_block(z, gen, key, b)
                    if j == 0:
                        torch.mul(z, v, out=acc)
                    else:
                        acc.add_(z, alpha=v)
                w = flat[s:e]
                if direct:
                    w.add_(acc, alpha=neg_lr)
                else:
                    w.copy_(w.float().add_(acc.to(w.device), alpha=neg_lr))

        tasks.extend(lambda c=c, task=task: task(c)
                     for c in _group_blocks(_blocks(flat.numel()), nthreads))
    _run(tasks, nthreads)
    for data, work in copybacks:  # non-contiguous params were updated through a contiguous copy
        data.copy_(work)
    return len(items)


def sample_seed_index(generator: torch.Generator, size: int,
                      probabilities: torch.Tensor | None = None) -> int:
    """Uniform (FedKSeed) or weighted (FedKSeed-Pro) pool index, from a seeded generator."""
    if probabilities is None:
        return int(torch.randint(size, (1,), generator=generator))
    return int(torch.multinomial(probabilities.to(torch.float64), 1, generator=generator))


@dataclass
class ZOResult:
    """What a client's local ZO run produced.

    `scalars[k]` is the sum of g over the steps that used seed k (float64, dense length K);
    `steps` lists every (seed index, g) in order (what FedKSeed-Pro's history needs);
    `losses` is (L+ + L-)/2 per step, MeZO's training-loss proxy (no extra forward).
    """

    scalars: torch.Tensor
    counts: torch.Tensor
    steps: list[tuple[int, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def sparse(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 indices ascending, float32 values) of the seeds this run touched."""
        idx = torch.nonzero(self.counts).view(-1)
        return idx, self.scalars[idx].to(torch.float32)


def zo_train(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], pool: SeedPool,
             batches: Iterable[Batch], steps: int, *, lr: float, eps: float,
             generator: torch.Generator, probabilities: torch.Tensor | None = None,
             loss_fn: LossFn = causal_lm_loss, threads: int | None = None) -> ZOResult:
    """T local ZO steps: draw seed, estimate g on the next batch, ``w <- w - lr*g*z`` in place.

    `batches` is consumed one batch per step (dict batches are moved to the params' device); a
    re-iterable (list) is cycled, an exhausted iterator raises. The model is updated in place;
    the returned scalars are what to upload.
    """
    scalars = torch.zeros(pool.size, dtype=torch.float64)
    counts = torch.zeros(pool.size, dtype=torch.int64)
    result = ZOResult(scalars, counts)
    device = params[0].device
    it = iter(batches)
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches)
            try:
                batch = next(it)
            except StopIteration:
                raise ValueError("zo_train: ran out of batches") from None
        if isinstance(batch, Mapping):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        k = sample_seed_index(generator, pool.size, probabilities)
        est = zo_step(model, params, pool.seed(k), eps, lr, batch, loss_fn, threads)
        scalars[k] += est.g
        counts[k] += 1
        result.steps.append((k, est.g))
        result.losses.append(0.5 * (est.loss_plus + est.loss_minus))
    return result


# --------------------------------------------------------------------------- FedKSeed-Pro


@dataclass
class SeedHistory:
    """Per-seed |g| history for FedKSeed-Pro, kept as sums (O(K), mergeable, serialisable).

    importance_k = mean over the seed's history of min(|g|, clip), where every history starts
    with one pseudo-entry `initial` (as in the reference implementations, default 0.0): a seed
    never used has importance `initial`, i.e. the minimum, so after min-max normalisation it gets
    the lowest probability, still >= 1/e of the highest (softmax of values in [0, 1]) - unused
    seeds keep being explored. `clip=None` means no clipping (the reference code clips at 0.5).
    """

    abs_sum: torch.Tensor
    count: torch.Tensor
    clip: float | None = None
    initial: float = 0.0

    @classmethod
    def empty(cls, size: int, clip: float | None = None, initial: float = 0.0) -> SeedHistory:
        return cls(torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.int64),
                   clip, initial)

    def record(self, steps: Iterable[tuple[int, float]]) -> None:
        """Add individual (seed index, g) observations (e.g. `ZOResult.steps`)."""
        for k, g in steps:
            a = abs(float(g))
            if self.clip is not None:
                a = min(a, self.clip)
            self.abs_sum[k] += a
            self.count[k] += 1

    def importance(self) -> torch.Tensor:
        return (self.abs_sum + self.initial) / (self.count + 1).to(torch.float64)

    def probabilities(self) -> torch.Tensor:
        """min-max normalised importance -> softmax (float64, sums to 1; uniform if all equal)."""
        return pro_probabilities(self.importance())


def pro_probabilities(importance: torch.Tensor) -> torch.Tensor:
    """softmax((a - min a) / (max a - min a)); all-equal importance gives the uniform law."""
    a = importance.to(torch.float64)
    span = float(a.max() - a.min())
    normed = (a - a.min()) / span if span > 0 else torch.zeros_like(a)
    return torch.softmax(normed, dim=0)


__all__ = [
    "BLOCK", "SeedPool", "direction", "direction_fingerprint", "zo_parameters", "perturbed",
    "ZOEstimate", "causal_lm_loss", "zo_estimate", "zo_step", "draw_directions", "apply_seed_scalars",
    "sample_seed_index",
    "ZOResult", "zo_train", "SeedHistory", "pro_probabilities",
]

