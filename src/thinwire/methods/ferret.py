"""Ferret (ALGORITHMS.md §3): first-order local training; the update crosses the wire as a few
thousand coordinates in a shared random basis, both ways.

Client: T first-order steps from the synced model, Δ = start − end, cut into blocks, K_l ∝ ‖Δ_l‖
coordinates per block (compress/projection.py), uploaded as 16-bit values plus one count per
block (positions are implicit: the first K_l bases of the block).
Server: the weighted mean of the coordinates per (block, basis) is the round's update, sent as
is to clients (never weights); every party applies it as w ← w − η_g·V·γ̄ with the bases
regenerated from the shared seed. The server learning rate of each round travels inside the
update, so a schedule needs no extra agreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from thinwire.compress.projection import (
    aggregate,
    allocate,
    block_norms,
    pack,
    partition_blocks,
    unpack,
)
from thinwire.compress.sketch import make_codec
from thinwire.config import Config, method_options, opt
from thinwire.errors import UsageError
from thinwire.methods import robust, validate
from thinwire.methods.base import Reply, Upload, snapshot
from thinwire.methods.history import HistoryServer, ReplicaClient
from thinwire.methods.space import UpdateSpace
from thinwire.wire import Payload, PayloadError

ADAMW_NOISE = (
    "ferret runs with train.optimizer = 'adamw', which amplifies the projection noise: an AdamW step moves "
    "every weight by about lr, so |Δ_l| ≈ lr·T·√d_l and the noise, ≈ √(d_l/K_l)·|Δ_l| per block, becomes "
    "≈ lr·T·√(d_l/K_l) per weight; the released code trains with SGD (train.optimizer = 'sgd', see docs/ferret.md)")

WIRE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class FerretOptions:
    """`[method.ferret]`. Defaults follow the paper, with its unbiased scaling."""

    trainable: str = opt("all", "what local training updates: all weights, or only a LoRA adapter",
                         choices=("all", "lora"))
    block_rule: str = opt("code", "block partition: the released code's rule, one block per matrix, "
                          "per tensor or per layer", choices=("code", "matrix", "tensor", "layer"))
    k_max: int = opt(200, "most coordinates per block (the code's K)", low=1, high=1 << 16)
    k_min: int = opt(2, "fewest coordinates of a block with a non-zero update", low=0, high=1 << 16)
    allocation: str = opt("code", "K_l ∝ ‖Δ_l‖: the code's floor rule, or a fixed total budget",
                          choices=("code", "proportional"))
    budget: int = opt(0, "total coordinates per client with allocation = 'proportional'", low=0,
                        high=1 << 24)
    scaling: str = opt("unbiased", "coordinate scaling: the paper's 1/(ρK) or the code's d/K",
                       choices=("unbiased", "code"))
    basis: str = opt("uniform", "basis distribution: fast uniform grid (same support and, up to "
                     "2/(15d), variance as the paper's truncated normal), 8-bit grid, signs, "
                     "the paper's truncated normal, or hashed signed buckets (a count sketch: same "
                     "error, O(d) instead of O(K·d) per block)",
                     choices=("uniform", "uniform8", "sign", "trunc_normal", "sketch"))
    fixed_bases: bool = opt(False, "reuse one basis pool every round (the released code) instead of fresh bases")
    clip: float = opt(10.0, "clip each reconstructed (basis, block) piece to this norm, in the released "
                      "code's units (its d/K scaling; 0: off)", low=0)
    momentum: float = opt(0.0, "server momentum on coordinates (needs fixed_bases)", low=0, high=0.999)
    server_lr: float = opt(1.0, "η_g: the server's step on the aggregated update (the paper's global "
                           "learning rate; lr_schedule shapes it over rounds)", low=0)
    lr_schedule: str = opt("constant", "schedule of server_lr over rounds",
                           choices=("constant", "cosine", "linear"))
    value_dtype: str = opt("float16", "precision of coordinates on the wire", choices=tuple(WIRE_DTYPES))
    threads: int = opt(0, "codec worker threads (0: torch's intra-op thread count)", low=0, high=1024)


class _FerretRule:
    """What client and server share: the blocks, the codec and how an update is applied."""

    def _setup_rule(self) -> None:
        self.options = options = method_options(self.config, "ferret", FerretOptions)
        if options.momentum and not options.fixed_bases:
            raise UsageError("method.ferret.momentum needs method.ferret.fixed_bases = true "
                             "(coordinates of fresh bases cannot be accumulated)")
        if options.allocation == "proportional" and options.budget < 1:
            raise UsageError("method.ferret.allocation = 'proportional' needs method.ferret.budget > 0")
        self.lora = options.trainable == "lora"
        _, params = self.ctx.workbench.trainable(self.lora)
        self.blocks = partition_blocks([(name, tuple(p.shape)) for name, p in params.items()], options.block_rule)
        seed, threads = self.config.federation.seed, options.threads or None
        if options.basis == "sketch":
            if options.scaling != "unbiased":
                raise UsageError("method.ferret.basis = 'sketch' needs method.ferret.scaling = 'unbiased' "
                                 "(the code's d/K scaling is defined for dense bases)")
        self.codec = make_codec(self.blocks, seed, options.basis, k_max=options.k_max, threads=threads)

    def clip_threshold(self) -> float | None:
        """`clip` in this run's coordinate scaling: the unbiased pieces are 1/(ρ_l·d_l) ≈ 3 times the
        code's (to 2/(15 d_l) relative), so the same pieces get clipped under either scaling."""
        if not self.options.clip:
            return None
        return self.options.clip * (3.0 if self.options.scaling == "unbiased" else 1.0)

    def basis_round(self, version: int) -> int:
        return 0 if self.options.fixed_bases else version

    @torch.no_grad()
    def apply_update(self, weights: dict[str, torch.Tensor], update: Payload, version: int) -> None:
        try:
            coords = unpack(update.tensors["values"], update.tensors["counts"])
        except (KeyError, ValueError) as exc:
            raise PayloadError(f"malformed Ferret update: {exc}") from exc
        if len(coords) != len(self.blocks) or any(c.numel() > self.options.k_max for c in coords):
            raise PayloadError(f"Ferret update has {len(coords)} blocks or too many coordinates")
        lr = float(update.scalars["lr"])
        for block, flat in self.codec.iter_reconstruct(coords, self.basis_round(version),
                                                       clip=self.clip_threshold()):
            for name, piece in block.split(flat).items():
                weights[name].sub_(piece.to(weights[name].device, weights[name].dtype), alpha=lr)


class CoordinateSpace(UpdateSpace):
    """The projection coordinates γ, every block padded with zeros to `k_max`. How many coordinates
    a client fills in a block depends on its data (the allocation follows its block norms), so
    every coordinate the server could receive gets noise, and a noised upload has the same shape
    whatever the data. Padding does not change what γ means: the scale 1/(ρK) is applied when
    projecting; the server only computes V γ̄."""

    def __init__(self, k_max: int, value_dtype: torch.dtype):
        super().__init__("projection coordinates")
        self.k_max, self.value_dtype = k_max, value_dtype

    def view(self, payload: Payload) -> dict[str, torch.Tensor]:
        view = {}
        for i, coords in enumerate(unpack(payload.tensors["values"], payload.tensors["counts"])):
            padded = torch.zeros(self.k_max)
            padded[: coords.numel()] = coords
            view[f"block{i}"] = padded
        return view

    def rebuild(self, payload: Payload, view: dict[str, torch.Tensor]) -> Payload:
        values, counts = pack([view[f"block{i}"] for i in range(len(view))], self.value_dtype)
        return Payload(tensors={"values": values, "counts": counts}, scalars=dict(payload.scalars))

    def dimension(self, server: Any) -> int:
        return len(server.blocks) * self.k_max


class FerretServer(_FerretRule, HistoryServer):
    server_step_key = "method.ferret.server_lr"

    @classmethod
    def update_space(cls, config: Config) -> UpdateSpace | None:
        options = method_options(config, "ferret", FerretOptions)
        return CoordinateSpace(options.k_max, WIRE_DTYPES[options.value_dtype])

    @classmethod
    def train_defaults(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The released code's local optimizer: plain SGD, momentum 0 (docs/ferret.md says why)."""
        return {"optimizer": "sgd"}

    def setup(self) -> None:
        self._setup_rule()
        super().setup()
        self.momentum: list[torch.Tensor] | None = None
        if self.config.train.optimizer == "adamw":
            self.ctx.warn(ADAMW_NOISE)

    def server_lr(self, rnd: int) -> float:
        base, rounds = self.options.server_lr, self.config.federation.rounds
        progress = (rnd - 1) / max(1, rounds - 1)
        if self.options.lr_schedule == "cosine":
            return base * 0.5 * (1 + math.cos(math.pi * progress))
        if self.options.lr_schedule == "linear":
            return base * (1 - progress)
        return base

    def check_update(self, reply: Reply) -> None:
        super().check_update(reply)
        tensors = reply.payload.tensors
        validate.check_names(tensors, ("values", "counts"))
        values = validate.check_tensor(tensors, "values", WIRE_DTYPES[self.options.value_dtype], ndim=1)
        counts = validate.check_tensor(tensors, "counts", torch.int32, shape=(len(self.blocks),))
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > self.options.k_max):
            raise PayloadError(f"a block count lies outside [0, k_max = {self.options.k_max}]")
        if int(counts.long().sum()) != values.numel():
            raise PayloadError(f"block counts add up to {int(counts.long().sum())}, not the {values.numel()} values sent")
        validate.int_scalar(reply.payload.scalars, "basis_round", self.basis_round(self.version + 1))

    def update_norm(self, reply: Reply) -> float:
        return robust.l2_norm(reply.payload.tensors, ["values"])

    def upload_bound(self) -> int:
        """At most k_max coordinates and one int32 count per block."""
        itemsize = WIRE_DTYPES[self.options.value_dtype].itemsize
        return len(self.blocks) * (self.options.k_max * itemsize + 4)

    def combine(self, rnd: int, replies: list[Reply]) -> tuple[Payload, dict[str, float]]:
        client_coords, factors = [], []
        for reply in replies:
            if int(reply.payload.scalars.get("basis_round", -1)) != self.basis_round(self.version + 1):
                raise PayloadError(f"client {reply.client_id} projected on the wrong round's bases")
            coords = unpack(reply.payload.tensors["values"], reply.payload.tensors["counts"])
            if len(coords) != len(self.blocks) or any(c.numel() > self.options.k_max for c in coords):
                raise PayloadError(f"client {reply.client_id} sent coordinates for the wrong blocks")
            factors.append(self.clip_factor(reply))
            client_coords.append([c * factors[-1] for c in coords] if factors[-1] < 1.0 else coords)
        cfg = self.config.method
        if not replies:
            mean = [torch.zeros(0) for _ in self.blocks]
        elif robust.is_mean(cfg.aggregation):
            mean = aggregate(client_coords, self.aggregation_weights(replies))
        else:
            mean = robust.combine_ragged(client_coords, cfg.aggregation, cfg.trim_fraction)
        if self.options.momentum:
            self.momentum = _momentum(self.momentum, mean, self.options.momentum)
            mean = self.momentum
        values, counts = pack(mean, WIRE_DTYPES[self.options.value_dtype])
        lr = self.server_lr(rnd)
        metrics = {"coordinates": float(values.numel()), "server_lr": lr}
        if self.clipping():
            metrics["clipped"] = float(sum(f < 1.0 for f in factors))
        return Payload(tensors={"values": values, "counts": counts}, scalars={"lr": lr}), metrics

    def state_dict(self) -> Payload | None:
        state = super().state_dict()
        if state is not None and self.momentum is not None:
            state.tensors.update({f"momentum/{i}": m for i, m in enumerate(self.momentum)})
            state.scalars["momentum_blocks"] = len(self.momentum)
        return state

    def load_state_dict(self, state: Payload) -> None:
        super().load_state_dict(state)
        blocks = state.scalars.get("momentum_blocks")
        self.momentum = None if blocks is None else [state.tensors[f"momentum/{i}"] for i in range(int(blocks))]


def _momentum(buffer: list[torch.Tensor] | None, coords: list[torch.Tensor], beta: float) -> list[torch.Tensor]:
    """m ← β·m + γ̄ per block, zero-padding to the longer of the two."""
    if buffer is None:
        return [c.clone() for c in coords]
    out = []
    for m, c in zip(buffer, coords):
        n = max(m.numel(), c.numel())
        mixed = torch.zeros(n, dtype=torch.float64)
        mixed[: m.numel()] += beta * m.double()
        mixed[: c.numel()] += c.double()
        out.append(mixed)
    return out


class FerretClient(_FerretRule, ReplicaClient):
    def __init__(self, ctx):
        super().__init__(ctx)
        self._setup_rule()

    def train_and_encode(self, model, params, rnd, client_id, examples) -> Upload:
        start = snapshot(params)
        stats = self.local_train(model, params, examples, rnd, client_id)
        delta = {name: start[name] - p.detach() for name, p in params.items()}
        del start
        opts = self.options
        ks = allocate(block_norms(self.blocks, delta), opts.k_max, opts.k_min, opts.allocation, opts.budget or None)
        basis_round = self.basis_round(self._replica_version + 1)
        coords = self.codec.project(delta, basis_round, ks, scaling=opts.scaling)
        values, counts = pack(coords, WIRE_DTYPES[opts.value_dtype])
        return Upload(Payload(tensors={"values": values, "counts": counts}, scalars={"basis_round": basis_round}),
                      len(examples), {"train_loss": stats.loss, "tokens": stats.tokens, "train_s": stats.seconds})
