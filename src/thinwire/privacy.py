"""Client-level differential privacy: DP-FedAvg's clip and Gaussian noise, on methods whose server
needs only the mean of the uploads, compressed ones included; (ε, δ) from Google's
dp-accounting RDP accountant.

Where a client's update is clipped and noised (its *update space*):

- `fedavg`: the weight delta Δ = w_start − w_end, every trained tensor together as one vector;
- `fedit`: the LoRA delta, A and B together as one vector (the server averages each);
- `ferret`: the projection coordinates γ, every block padded with zeros to `k_max`. How many
  coordinates a client fills in a block depends on its data (the allocation follows its block
  norms), so every coordinate the server could receive gets noise, and a noised upload has the
  same shape whatever the data. Padding does not change what γ means: the scale 1/(ρK) is
  applied when projecting, the server only computes V γ̄.
- `fedkseed`: the per-seed sums ΔG over the whole pool of K seeds, as one dense K-vector (a
  client's seeds are zero where it drew none). The model update −η Σ_s ΔḠ_s z_s is linear in
  the mean of those vectors. Every one of the K entries gets noise, so a noised upload carries
  K scalars (16 KB at K = 4096) instead of one per local step. FedKSeed-Pro is not covered: its
  server records every client's per-step |g| in the clear to steer the seed sampling.

Why the sensitivity holds. A client's update u is clipped to ‖u‖₂ ≤ C in that space. The
server's aggregate is the equal-weight mean (1/r) Σ u_i over the r accepted replies, linear in
the update space, and everything after it (the server optimizer, Ferret's reconstruction, its
per-piece clip and momentum) reads only that mean: post-processing. The sampler draws a
fixed-size sample without replacement each round, for which the accountant is defined under
replace-one neighbours: replacing one client's data moves one u_i anywhere in the C-ball, so
Σ u_i moves by at most 2C.

- Central DP adds N(0, (zC)²) to the sum. The server draws it as N(0, (zC)²/r) on each of the
  r clipped updates, in float32, before the method's own mean: the shares sum to exactly that
  distribution, so every method keeps its aggregation code. Accounting: a Gaussian mechanism of
  noise multiplier zC / 2C = z/2, subsampled without replacement (m of N clients), once per
  aggregated round.
- Local DP: each client adds N(0, (zC)²) to its own clipped update before it leaves. Against
  the server each upload is a Gaussian mechanism of multiplier z/2 (no amplification: the
  server knows whom it sampled), composed over every upload the client sent (accepted or not);
  the run reports its most exposed client. The noise must be secret from the server: on Flower
  a client draws it from the operating system's randomness; only the in-process runtime, where
  server and clients are one program, draws it from the run's seeded stream (reproducible).

The guarantee needs the equal-weight mean (`method.weighting = "equal"`, the default under DP),
`method.aggregation = "mean"`, no `clip_update_norm` (it would rescale noised shares) and no
`max_update_norm` (a rejection that depends on the update would make r depend on the data); a
config that breaks one of these, or names a method outside the list above, is a usage error.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import TYPE_CHECKING, Any

import torch

from thinwire.errors import UsageError
from thinwire.seeding import torch_generator
from thinwire.wire import Payload

if TYPE_CHECKING:
    from thinwire.config import Config

UPDATE_SPACE = {"fedavg": "weight delta", "fedit": "LoRA delta (A and B)", "ferret": "projection coordinates",
                "fedkseed": "per-seed sums over the seed pool"}
UNSUPPORTED = {
    "fedkseed-pro": "its server records every client's per-step |g| in the clear to steer the seed sampling",
    "cgfedllm": "its server trains the autoencoder on clients' raw updates",
    "fedpt": "its clients' adapters are distilled on the server one by one",
}
SECAGG_MOD_RANGE = 1 << 32  # SecAgg+ sums modulo 2^32 (Flower's default modulus_range)
ACCOUNTANT = "dp-accounting RDP, replace-one, sampled without replacement"


def check_privacy(config: Config) -> None:
    """A one-line usage error for every `[privacy]` setting whose guarantee would not hold."""
    privacy, method = config.privacy, config.method
    if privacy.dp == "none" and not privacy.secagg:
        return
    where = f"privacy.dp = '{privacy.dp}'" if privacy.dp != "none" else "privacy.secagg = true"
    if method.name not in UPDATE_SPACE:
        raise UsageError(f"{where} does not support method {method.name!r}: {UNSUPPORTED[method.name]}; "
                         f"use one of {', '.join(UPDATE_SPACE)}")
    rules = [(method.weighting == "equal", "method.weighting = 'equal' (a client's weight must not depend on "
                                           "what it claims)"),
             (method.aggregation == "mean", "method.aggregation = 'mean' (the sensitivity bound is for a sum)"),
             (method.clip_update_norm == 0, "method.clip_update_norm = 0 (the server may not rescale single "
                                            "updates; under DP privacy.clip_norm clips)"),
             (method.max_update_norm == 0, "method.max_update_norm = 0 (a rejection that depends on the update "
                                           "would leak it)")]
    if privacy.secagg:
        fed = config.federation
        rules += [(privacy.dp != "central", "privacy.dp = 'local' or 'none' (the server sees only the sum, so "
                                            "it cannot clip each update; clients noise their own)"),
                  (fed.clients_per_round * privacy.secagg_quantization < SECAGG_MOD_RANGE,
                   "federation.clients_per_round x privacy.secagg_quantization below 2^32 (the sum must not wrap)")]
    for holds, needed in rules:
        if not holds:
            raise UsageError(f"{where} needs {needed}")


def update_view(method: str, payload: Payload, k_max: int, pool_size: int = 0) -> dict[str, torch.Tensor]:
    """The upload's update in its DP space, as float32 tensors of a shape fixed by the method."""
    if method == "fedkseed":
        dense = torch.zeros(pool_size).index_add_(0, payload.tensors["seeds"].long(), payload.tensors["values"].float())
        return {"sums": dense}
    if method == "ferret":
        from thinwire.compress.projection import unpack

        view = {}
        for i, coords in enumerate(unpack(payload.tensors["values"], payload.tensors["counts"])):
            padded = torch.zeros(k_max)
            padded[: coords.numel()] = coords
            view[f"block{i}"] = padded
        return view
    return {name: t.float() for name, t in payload.tensors.items()}


def with_update(method: str, payload: Payload, view: dict[str, torch.Tensor], wire_dtype: torch.dtype) -> Payload:
    """`payload` with its update replaced by `view` (Ferret's coordinates in `wire_dtype`)."""
    if method == "fedkseed":
        sums = view["sums"]
        return Payload(tensors={"seeds": torch.arange(sums.numel(), dtype=torch.int32), "values": sums.float()},
                       scalars=dict(payload.scalars))
    if method == "ferret":
        from thinwire.compress.projection import pack

        values, counts = pack([view[f"block{i}"] for i in range(len(view))], wire_dtype)
        return Payload(tensors={"values": values, "counts": counts}, scalars=dict(payload.scalars))
    return Payload(tensors={name: t.to(payload.tensors[name].dtype) for name, t in view.items()},
                   scalars=dict(payload.scalars))


def clip_and_noise(view: dict[str, torch.Tensor], clip_norm: float, noise_std: float,
                   generator: torch.Generator) -> tuple[dict[str, torch.Tensor], float]:
    """The view scaled into the clip_norm ball, plus N(0, noise_std²) on every entry (in name
    order, from `generator`); also returns the norm before clipping."""
    norm = math.sqrt(math.fsum(float(t.double().pow(2).sum()) for t in view.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for name in sorted(view):
        t = view[name] * scale
        if noise_std > 0:
            t = t + noise_std * torch.randn(t.shape, generator=generator)
        out[name] = t
    return out, norm


def _k_max(config: Config) -> int:
    return int(config.method.options.get("ferret", {}).get("k_max", 0))


def _pool_size(config: Config) -> int:
    return int(config.method.options.get("fedkseed", {}).get("pool_size", 0))


def update_dimension(config: Config, server: Any) -> int:
    """How many values a client's update has in its update space, as the server knows it."""
    method = config.method.name
    if method == "ferret":
        return len(server.blocks) * _k_max(config)
    if method == "fedkseed":
        return _pool_size(config)
    return server.trainable_parameters()


def update_view_of(config: Config, payload: Payload) -> dict[str, torch.Tensor]:
    """`update_view` with the run's method, k_max and pool size."""
    return update_view(config.method.name, payload, _k_max(config), _pool_size(config))


def wire_dtype(config: Config) -> torch.dtype:
    """The dtype Ferret's coordinates travel in."""
    return getattr(torch, config.method.options.get("ferret", {}).get("value_dtype", "float16"))


def privatize_upload(config: Config, rnd: int, client_id: int, payload: Payload, *, secret: bool) -> Payload:
    """Local DP, on the client: its clipped update plus N(0, (zC)²), on the wire dtype. With
    `secret` the noise comes from the OS (a real client); else from the run's seeded stream."""
    if config.privacy.dp != "local":
        return payload
    privacy, method = config.privacy, config.method.name
    if secret:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    else:
        generator = torch_generator(config.federation.seed, "dp-local", rnd, client_id)
    view, _ = clip_and_noise(update_view_of(config, payload), privacy.clip_norm,
                             privacy.noise_multiplier * privacy.clip_norm, generator)
    return with_update(method, payload, view, wire_dtype(config) if method == "ferret" else torch.float32)


def privatize_round(config: Config, rnd: int, replies: list[Any]) -> tuple[list[Any], dict[str, float]]:
    """Central DP, on the server: every accepted reply clipped, plus its N(0, (zC)²/r) share of
    the noise on the sum (float32, so the method's mean is exactly linear in the shares)."""
    if config.privacy.dp != "central" or not replies:
        return replies, {}
    privacy, method = config.privacy, config.method.name
    share = privacy.noise_multiplier * privacy.clip_norm / math.sqrt(len(replies))
    out, norms = [], []
    for reply in replies:
        generator = torch_generator(config.federation.seed, "dp-central", rnd, reply.client_id)
        view, norm = clip_and_noise(update_view_of(config, reply.payload), privacy.clip_norm, share, generator)
        norms.append(norm)
        out.append(dataclasses.replace(reply, payload=with_update(method, reply.payload, view, torch.float32)))
    clipped = sum(n > privacy.clip_norm for n in norms)
    dimension = sum(t.numel() for t in update_view_of(config, replies[0].payload).values())
    # the noise on the mean against the largest update it can hide, per round: z·√d / r
    return out, {"dp_clipped": float(clipped), "dp_update_norm_median": float(sorted(norms)[len(norms) // 2]),
                 "dp_dimension": float(dimension),
                 "dp_noise_to_clip": privacy.noise_multiplier * math.sqrt(dimension) / len(replies)}


def epsilon(config: Config, rounds: list[dict[str, Any]]) -> float:
    """The (ε, δ = privacy.delta) the run has spent over `rounds` (its round records so far)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    privacy, fed = config.privacy, config.federation
    if privacy.dp == "none" or privacy.noise_multiplier == 0:
        return math.inf
    gaussian = dp_accounting.GaussianDpEvent(privacy.noise_multiplier / 2)  # sensitivity 2C under replace-one
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    if privacy.dp == "central":
        released = sum(1 for r in rounds if not r.get("skipped"))
        event = dp_accounting.SampledWithoutReplacementDpEvent(fed.clients, fed.clients_per_round, gaussian)
        accountant.compose(event, released)
    else:
        participations: dict[int, int] = {}
        for r in rounds:  # every upload that reached the server, used or not
            sent = [*r.get("clients", []), *r.get("failures", []), *r.get("rejected", [])]
            for c in sent:
                if c.get("uplink_bytes") is not None:
                    participations[c["client"]] = participations.get(c["client"], 0) + 1
        accountant.compose(gaussian, max(participations.values(), default=0))
    return float(accountant.get_epsilon(privacy.delta))


def summary(config: Config, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's `privacy`: the mechanism, its settings and the (ε, δ) spent."""
    privacy = config.privacy
    return {"dp": privacy.dp, "clip_norm": privacy.clip_norm, "noise_multiplier": privacy.noise_multiplier,
            "delta": privacy.delta, "epsilon": epsilon(config, rounds), "update_space": UPDATE_SPACE[config.method.name],
            "accountant": ACCOUNTANT}


def privacy_text(summary: dict[str, Any]) -> str:
    """A run's client-level DP in one cell: the ε spent at its δ and the mechanism, or 'none'."""
    privacy = summary.get("privacy") or {}
    if privacy.get("dp", "none") == "none":
        return "none"
    spent = privacy["epsilon"]
    return f"ε {'∞' if math.isinf(spent) else f'{spent:.2f}'}, δ {privacy['delta']:g} ({privacy['dp']})"
