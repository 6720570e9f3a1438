"""Robust aggregation: coordinate-wise median, trimmed mean, and per-client norm clipping.

`[method] aggregation` picks how the accepted uploads of a round are combined:

- ``"bounded-mean"`` (the default without privacy): the weighted mean after each client's update is
  clipped to `norm_bound_factor` (3) × the round's lower median update norm (`adaptive_bound`). With
  an honest majority the median is an honest norm, so one client, whatever it scales its update
  by, moves the round by at most what a client at the bound does; an honest update is clipped only
  when it is 3× longer than the median one (clean runs: never, see benchmarks/attacks.py). Under
  `privacy.dp` or `privacy.secagg` the default is ``"mean"``: DP clips each update to its own bound,
  and under SecAgg the server sees only the sum.
- ``"mean"``: the weighted mean (by example count or equal, `[method] weighting`): the methods'
  original rule, bit for bit.
- ``"median"``: per coordinate, the median over clients (the mean of the two middle values for an
  even count). Unweighted: a client's claimed example count cannot buy it influence.
- ``"trimmed-mean"``: per coordinate, drop the t largest and t smallest client values and average
  the rest, t = ceil(trim_fraction·n) capped at (n − 1) // 2 (so 3 clients with any fraction > 0
  trim one from each end, i.e. the median). Unweighted.

What a "coordinate" is depends on the method's update space: a weight (FedAvg / FedIT deltas), a
(block, basis) coefficient (Ferret; a client that sent fewer coefficients for a block contributes
0 beyond its count, exactly as in the mean), a pool seed's scalar (FedKSeed; a seed a client did
not step on contributes 0, so the median moves a seed only when most clients stepped on it: use a
pool that is small against `local_steps`, or clipping).

`[method] clip_update_norm` scales each client's update down to that L2 norm (measured in the
method's own update space, `ServerSide.update_norm`) before any rule; a hostile ×100 update then
weighs no more than an honest one.

Everything here is deterministic: sorts of exact values, sums in a fixed client order, norms in
sorted-name order in float64 (safetensors decodes tensors in a random order, so dict order must
never reach an arithmetic result).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

RULES = ("bounded-mean", "mean", "median", "trimmed-mean")
CHUNK = 1 << 20
"""Coordinates reduced at a time: n clients × CHUNK floats of scratch, whatever the tensor size."""


def trim_count(n: int, fraction: float) -> int:
    """Clients dropped from each end of every coordinate by the trimmed mean."""
    if fraction <= 0 or n < 3:
        return 0
    return min(math.ceil(fraction * n - 1e-9), (n - 1) // 2)


def is_mean(rule: str) -> bool:
    """Rules that combine by the weighted mean (bounded-mean clips first, through `clip_factor`)."""
    return rule in ("mean", "bounded-mean")


def adaptive_bound(norms: Sequence[float], factor: float) -> float:
    """bounded-mean's clip norm: `factor` × the lower median of the round's update norms.

    The lower median (the smaller middle value for an even count) is an honest norm whenever
    honest clients are a majority, and for two replies it is the smaller one, so one client
    cannot raise the bound by inflating its own norm."""
    ordered = sorted(norms)
    return factor * ordered[(len(ordered) - 1) // 2] if ordered else 0.0


def l2_norm(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> float:
    """L2 norm over `names` (default: every floating tensor), in sorted-name order, in float64."""
    keys = sorted(names if names is not None else (k for k, t in tensors.items() if t.is_floating_point()))
    total = math.fsum(float(tensors[k].detach().double().pow(2).sum()) for k in keys)
    return math.sqrt(total)


def clip_factor(norm: float, max_norm: float) -> float:
    """1, or the factor that brings `norm` down to `max_norm` (0 = no clipping)."""
    if max_norm <= 0 or not norm > max_norm:
        return 1.0
    return max_norm / norm


@torch.no_grad()
def reduce_stack(stack: torch.Tensor, rule: str, trim_fraction: float = 0.0) -> torch.Tensor:
    """Combine a [clients, m] stack into [m] by `rule` (median or trimmed-mean), unweighted."""
    n = stack.shape[0]
    if n == 0:
        raise ValueError("reduce_stack: no clients")
    if rule == "median":
        ordered = stack.sort(dim=0).values
        if n % 2:
            return ordered[n // 2].clone()
        return ((ordered[n // 2 - 1].double() + ordered[n // 2].double()) / 2).to(stack.dtype)
    if rule == "trimmed-mean":
        t = trim_count(n, trim_fraction)
        ordered = stack.sort(dim=0).values if t else stack
        acc = ordered[t].double().clone()
        for i in range(t + 1, n - t):  # fixed order: deterministic
            acc += ordered[i].double()
        return (acc / (n - 2 * t)).to(stack.dtype)
    raise ValueError(f"unknown robust aggregation rule {rule!r}; use one of {', '.join(RULES)}")


@torch.no_grad()
def coordinatewise(tensors: Sequence[torch.Tensor], rule: str, trim_fraction: float = 0.0,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-coordinate `rule` over same-shaped client tensors, in chunks of `CHUNK` coordinates."""
    flat = [t.detach().reshape(-1) for t in tensors]
    out = torch.empty(flat[0].numel(), dtype=dtype, device=flat[0].device)
    for start in range(0, out.numel(), CHUNK):
        stack = torch.stack([f[start:start + CHUNK].to(dtype) for f in flat])
        out[start:start + CHUNK] = reduce_stack(stack, rule, trim_fraction)
    return out.view(tensors[0].shape)


@torch.no_grad()
def combine_tensors(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], rule: str,
                    trim_fraction: float = 0.0) -> dict[str, torch.Tensor]:
    """FedAvg/FedIT: the round's float32 update per tensor name, by `rule`."""
    if is_mean(rule):
        from thinwire.methods.aggregate import weighted_mean

        return weighted_mean(list(updates), list(weights))
    return {name: coordinatewise([u[name] for u in updates], rule, trim_fraction) for name in updates[0]}


@torch.no_grad()
def combine_ragged(client_coords: Sequence[Sequence[torch.Tensor]], rule: str,
                   trim_fraction: float = 0.0) -> list[torch.Tensor]:
    """Ferret: per block, clients' coefficient vectors zero-padded to the longest, then `rule`."""
    blocks = len(client_coords[0])
    out = []
    for b in range(blocks):
        k = max(int(c[b].numel()) for c in client_coords)
        stack = torch.zeros(len(client_coords), k, dtype=torch.float64)
        for i, c in enumerate(client_coords):
            stack[i, : c[b].numel()] = c[b].reshape(-1).double()
        out.append(reduce_stack(stack, rule, trim_fraction).float() if k else torch.zeros(0))
    return out


def scale(tensors: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Floating tensors multiplied by `factor` (others unchanged); the input is left alone."""
    if factor == 1.0:
        return dict(tensors)
    return {k: t * factor if t.is_floating_point() else t for k, t in tensors.items()}
