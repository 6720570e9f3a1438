"""Client-level differential privacy: DP-FedAvg's clip and Gaussian noise in the update space a
method declares (methods/space.py), an accountant over every release, and the rules without
which the guarantee would not hold. docs/privacy.md states the threat model.

- Central DP: the trusted server clips each accepted update to norm C in the space and adds
  N(0, (zC)²) to their sum, drawn as N(0, (zC)²/r) on each of the r clipped updates (in float32,
  so every method keeps its own mean). Everything after the mean is post-processing.
- Local DP: each client clips its own update and adds N(0, (zC)²) before it leaves; nobody,
  the server included, is trusted.

Noise comes from a secret key (secret.py: 256 bits of OS entropy), never from the run seed: the
server's key lives only in its checkpoint, each client's in its own ClientState. A non-finite
update is clipped to the zero vector, so that whether a client's training diverged is never
visible: the server makes no decision on what a client's data did.

Accounting: replace-one neighbours, so one client's data moves the sum by at most 2C and each
release is a Gaussian mechanism of multiplier z/2, composed (dp-accounting's RDP accountant) over
the releases that touched that client; the run reports its most exposed client. A release is
every download the server sent under DP, whatever became of it (failed, late, rejected, retried,
skipped round, a round lost to a crash before resume): the ledger (`privacy_ledger.jsonl`) is
written and synced before the downloads leave. No amplification by sampling is claimed: the
sample is drawn from the public seed and published in metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from thinwire import secret
from thinwire.errors import UsageError
from thinwire.wire import Payload

if TYPE_CHECKING:
    from thinwire.config import Config
    from thinwire.methods.base import ClientState, Reply
    from thinwire.methods.space import UpdateSpace

SECAGG_MOD_RANGE = 1 << 32  # SecAgg+ sums modulo 2^32 (Flower's default modulus_range)
ACCOUNTANT = ("dp-accounting RDP, replace-one, every release composed per client (no amplification by "
              "sampling: the sample is public)")
LEDGER = "privacy_ledger.jsonl"
CLIENT_KEY = "thinwire.dp_key"  # a client's noise key in its ClientState


def private(config: Config) -> bool:
    """Whether a privacy mechanism runs: then no per-client figure travels or is logged in the clear."""
    return config.privacy.dp != "none" or config.privacy.secagg


def update_space(config: Config) -> UpdateSpace:
    """The running method's update space, or a usage error saying why it has none."""
    from thinwire.methods import METHOD_NAMES, get_method

    server = get_method(config.method.name).server
    space = server.update_space(config)
    if space is None:
        where = f"privacy.dp = '{config.privacy.dp}'" if config.privacy.dp != "none" else "privacy.secagg = true"
        spaced = [name for name in METHOD_NAMES if get_method(name).server.update_space(config) is not None]
        raise UsageError(f"{where} does not support method {config.method.name!r}: {server.private_refusal}; "
                         f"choose one that declares an update space: {', '.join(spaced)}")
    return space


def check_privacy(config: Config) -> None:
    """A one-line usage error for every `[privacy]` setting whose guarantee would not hold."""
    from thinwire.methods.server_opt import reads_client_updates

    privacy, method = config.privacy, config.method
    if not private(config):
        return
    update_space(config)
    where = f"privacy.dp = '{privacy.dp}'" if privacy.dp != "none" else "privacy.secagg = true"
    sum_only = privacy.dp == "central" or privacy.secagg  # the server may read only the (noised) sum
    rules = [(method.weighting == "equal", "method.weighting = 'equal' (a client's weight must not depend on "
                                           "what it claims)"),
             (method.aggregation == "mean", "method.aggregation = 'mean' (the sensitivity bound is for a sum)"),
             (method.clip_update_norm == 0, "method.clip_update_norm = 0 (the server may not rescale single "
                                            "updates; under DP privacy.clip_norm clips)"),
             (method.max_update_norm == 0, "method.max_update_norm = 0 (a rejection that depends on the update "
                                           "would leak it)"),
             (not (sum_only and reads_client_updates(method)),
              f"a server step that reads only the mean, not method.server_optimizer = '{method.server_optimizer}' "
              "(it reads each client's update)")]
    if privacy.secagg:
        fed = config.federation
        rules += [(privacy.dp != "central", "privacy.dp = 'local' or 'none' (the server sees only the sum, so "
                                            "it cannot clip each update; clients noise their own)"),
                  (fed.clients_per_round * privacy.secagg_quantization < SECAGG_MOD_RANGE,
                   "federation.clients_per_round x privacy.secagg_quantization below 2^32 (the sum must not wrap)"),
                  (privacy.secagg_threshold > 0.5 or privacy.secagg_allow_low_threshold,
                   "privacy.secagg_threshold above 0.5 (at or below half, a server that sends clients inconsistent "
                   "lists can unmask one; set privacy.secagg_allow_low_threshold = true to accept that)")]
    for holds, needed in rules:
        if not holds:
            raise UsageError(f"{where} needs {needed}")


def clip_and_noise(view: dict[str, torch.Tensor], clip_norm: float, noise_std: float, key: bytes,
                   *labels: object) -> dict[str, torch.Tensor]:
    """The view scaled into the clip_norm ball (a non-finite one: the zero vector), plus
    N(0, noise_std²) on every entry from the secret stream (key, labels, tensor name)."""
    norm = math.sqrt(math.fsum(float(t.double().pow(2).sum()) for t in view.values()))
    scale = 0.0 if not math.isfinite(norm) else min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for name in sorted(view):
        t = view[name] * scale if scale else torch.zeros_like(view[name])
        if noise_std > 0:
            t = t + noise_std * secret.normal(key, t.shape, *labels, name)
        out[name] = t
    return out


def client_key(state: ClientState) -> bytes:
    """The client's own noise key, made on its first private upload and kept in its state."""
    if CLIENT_KEY not in state.tensors:
        state.tensors[CLIENT_KEY] = secret.key_tensor(secret.new_key())
    return secret.key_bytes(state.tensors[CLIENT_KEY])


def privatize_upload(config: Config, rnd: int, payload: Payload, state: ClientState) -> Payload:
    """Local DP, on the client: its clipped update plus N(0, (zC)²) from its own key."""
    if config.privacy.dp != "local":
        return payload
    privacy, space = config.privacy, update_space(config)
    view = clip_and_noise(space.view(payload), privacy.clip_norm, privacy.noise_multiplier * privacy.clip_norm,
                          client_key(state), "dp-local", rnd)
    return space.rebuild(payload, view)


class CentralDP:
    """Central DP around the method's aggregation: each accepted update clipped, plus its share of
    the noise on the sum. `key` is the server's secret (checkpointed, never published)."""

    def __init__(self, config: Config, key: bytes):
        self.config, self.key = config, key
        self.space = update_space(config)

    def screen(self, payload: Payload) -> Payload:
        """An upload whose update is non-finite or beyond `method.max_update_value` replaced by the
        zero update, before validation: a rejection would reveal that a client's training diverged."""
        view, bound = self.space.view(payload), self.config.method.max_update_value
        if all(bool(torch.isfinite(t).all()) and (not bound or not t.numel() or float(t.abs().max()) <= bound)
               for t in view.values()):
            return payload
        return self.space.rebuild(payload, {name: torch.zeros_like(t) for name, t in view.items()})

    def privatize(self, rnd: int, replies: list[Reply], dimension: int) -> tuple[list[Reply], dict[str, float]]:
        if not replies:
            return replies, {}
        privacy = self.config.privacy
        share = privacy.noise_multiplier * privacy.clip_norm / math.sqrt(len(replies))
        out = []
        for reply in replies:
            view = clip_and_noise(self.space.view(reply.payload), privacy.clip_norm, share, self.key,
                                  "dp-central", rnd, reply.client_id)
            out.append(dataclasses.replace(reply, payload=self.space.rebuild(reply.payload, view)))
        # public figures only: the noise on the mean against the largest update it can hide, z·√d / r
        return out, {"dp_dimension": float(dimension),
                     "dp_noise_to_clip": privacy.noise_multiplier * math.sqrt(dimension) / len(replies)}


class Ledger:
    """Every release under DP, appended and synced before it happens, so that no crash, retry or
    resume can make the reported ε smaller than what was spent."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def record(self, rnd: int, attempt: int, clients: list[int]) -> None:
        line = json.dumps({"round": rnd, "attempt": attempt, "clients": sorted(clients)}) + "\n"
        with open(self.path, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def participations(self) -> dict[int, int]:
        """client -> releases that touched it."""
        counts: dict[int, int] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                for cid in json.loads(line)["clients"]:
                    counts[int(cid)] = counts.get(int(cid), 0) + 1
        return counts


def epsilon(config: Config, participations: dict[int, int]) -> float:
    """The ε (at δ = privacy.delta) of the most exposed client, over its releases."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    privacy = config.privacy
    if privacy.dp == "none" or privacy.noise_multiplier == 0:
        return math.inf
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.GaussianDpEvent(privacy.noise_multiplier / 2),  # sensitivity 2C
                       max(participations.values(), default=0))
    return float(accountant.get_epsilon(privacy.delta))


def summary(config: Config, participations: dict[int, int]) -> dict[str, Any]:
    """summary.json's `privacy`: the mechanism, its settings and the (ε, δ) spent."""
    privacy = config.privacy
    return {"dp": privacy.dp, "clip_norm": privacy.clip_norm, "noise_multiplier": privacy.noise_multiplier,
            "delta": privacy.delta, "epsilon": epsilon(config, participations),
            "releases_max": max(participations.values(), default=0),
            "update_space": update_space(config).description, "accountant": ACCOUNTANT}


def privacy_text(summary: dict[str, Any]) -> str:
    """A run's client-level DP in one cell: the ε spent at its δ and the mechanism, or 'none'."""
    privacy = summary.get("privacy") or {}
    if privacy.get("dp", "none") == "none":
        return "none"
    spent = privacy["epsilon"]
    return f"ε {'∞' if math.isinf(spent) else f'{spent:.2f}'}, δ {privacy['delta']:g} ({privacy['dp']})"
