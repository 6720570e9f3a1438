"""FedKSeed and FedKSeed-Pro (ALGORITHMS.md §2): zeroth-order full-parameter tuning where every
message is seed indices and scalars.

Client: `local_steps` two-point ZO steps, each on a seed drawn from the run-wide pool of K
(uniformly, or by FedKSeed-Pro's probabilities), uploading the per-seed sums of g.
Server: the round's update is the weighted mean of those sums per seed; any party applies it as
w ← w − η·Σ_s ΔG_s·z_s with z_s regenerated from the seed. Clients download the updates of the
rounds they have not applied (see history.py), never weights; where those would exceed the
paper's bound, the K accumulated sums over the missed rounds instead.
FedKSeed-Pro: the server keeps every seed's |g| history and sends the sampling probabilities
(min–max normalised mean |g|, softmax) with each download, as float16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from thinwire.config import MAX_BATCH, MAX_STEPS, Config, method_options, opt
from thinwire.methods import robust, validate
from thinwire.methods.base import Reply, Upload
from thinwire.methods.history import HistoryServer, ReplicaClient
from thinwire.methods.space import UpdateSpace
from thinwire.seeding import derive_seed, torch_generator
from thinwire.train.first_order import batch_stream
from thinwire.train.zeroth_order import SeedHistory, SeedPool, apply_seed_scalars, zo_train
from thinwire.wire import Payload, PayloadError


@dataclass
class FedKSeedOptions:
    """`[method.fedkseed]`, which also configures fedkseed-pro. Defaults: the paper's settings."""

    pool_size: int = opt(4096, "K: candidate seeds shared for the whole run (dense per-seed sums: 8 bytes "
                         "each)", low=1, high=1 << 24)
    eps: float = opt(5e-4, "perturbation scale ε of the two-point estimate", low=1e-12)
    lr: float = opt(3e-7, "ZO learning rate η (clients and the server's rebuild)", low=0)
    global_lr_scale: float = opt(1.0, "multiplies η where a round's (seed, ΔG) pairs update the global model "
                                 "(the server's rebuild and every client's replay); local ZO steps keep η", low=0)
    local_steps: int = opt(200, "ZO steps per client per round", low=1, high=MAX_STEPS)
    batch_size: int = opt(1, "examples per ZO step", low=1, high=MAX_BATCH)
    pro_clip: float = opt(0.0, "FedKSeed-Pro: clip |g| at this value in the history (0: off)", low=0)


class _FedKSeedRule:
    """The update rule both sides share: apply a round's (seed, ΔG) pairs to the weights."""

    pro = False

    def _setup_rule(self) -> None:
        self.options = method_options(self.config, "fedkseed", FedKSeedOptions)
        self.pool = SeedPool(self.options.pool_size, derive_seed(self.config.federation.seed, "fedkseed-pool"))

    merges_catch_up = True

    def apply_update(self, weights: dict[str, torch.Tensor], update: Payload, version: int) -> None:
        seeds, values = update.tensors["seeds"], update.tensors["values"]
        if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= self.pool.size):
            raise PayloadError(f"seed index outside the pool of {self.pool.size}")
        scalars = dict(zip(seeds.tolist(), values.tolist()))
        apply_seed_scalars(list(weights.values()), self.pool, scalars, self.step_lr(), threads=1)

    def step_lr(self) -> float:
        return self.options.lr * self.options.global_lr_scale

    def seed_sums(self, updates: list[Payload], start: torch.Tensor | None = None) -> torch.Tensor:
        """`start` (default 0) + Σ ΔG per seed over `updates` (float64, dense K), in version order."""
        total = torch.zeros(self.pool.size, dtype=torch.float64) if start is None else start.clone()
        for update in updates:
            total.index_add_(0, update.tensors["seeds"].long(), update.tensors["values"].double())
        return total

    # A replica's record at a version is G, the accumulated per-seed sums that produced it.

    def is_merged(self, download: Payload) -> bool:
        return MERGED in download.tensors

    def hold(self, held: Payload | None, update: Payload) -> Payload:
        return Payload(tensors={"G": self.seed_sums([update], _sums(held))})

    def apply_merged(self, weights: dict[str, torch.Tensor], download: Payload, held_since: Payload | None,
                     held_now: Payload | None) -> Payload:
        """w ← w − η·Σ_s (G_since + merged − G_now)_s·z_s: the merged sums less what the replica
        already applied. Equal to applying the rounds one by one up to float32 rounding."""
        merged = download.tensors[MERGED]
        if merged.dtype != torch.float64 or tuple(merged.shape) != (self.pool.size,) or not torch.isfinite(merged).all():
            raise PayloadError(f"merged catch-up must be {self.pool.size} finite float64 sums")
        target = _sums(held_since, self.pool.size) + merged
        apply_seed_scalars(list(weights.values()), self.pool, target - _sums(held_now, self.pool.size),
                           self.step_lr(), threads=1)
        return Payload(tensors={"G": target})


MERGED = "merged"


def _check_step_records(seeds: torch.Tensor, values: torch.Tensor, step_seeds: torch.Tensor,
                        step_g: torch.Tensor, size: int) -> None:
    """FedKSeed-Pro's per-step history must add up to the per-seed sums the update carries: the
    history steers every client's seed sampling, so a client may not claim g it did not apply."""
    if set(step_seeds.tolist()) != set(seeds.tolist()):
        raise PayloadError("step records name other seeds than the update")
    if not (torch.isfinite(values).all() and torch.isfinite(step_g).all()):
        raise PayloadError("non-finite per-seed sums or step records")
    sums = torch.zeros(size, dtype=torch.float64).index_add_(0, step_seeds.long(), step_g.double())[seeds.long()]
    scale = 1.0 + (float(values.abs().max()) if values.numel() else 0.0)
    if not torch.allclose(sums, values.double(), rtol=1e-5, atol=1e-6 * scale):
        raise PayloadError("step records do not add up to the per-seed sums sent")


def _sums(held: Payload | None, size: int | None = None) -> torch.Tensor | None:
    """A record's accumulated sums G (zeros of `size` for the base model; None without a size)."""
    if held is not None:
        return held.tensors["G"]
    return None if size is None else torch.zeros(size, dtype=torch.float64)


class SeedSumSpace(UpdateSpace):
    """The per-seed sums ΔG over the whole pool, as one dense K-vector (zero where a client drew no
    seed): the model update −η Σ_s ΔḠ_s z_s is linear in their mean. Noise fills every entry, so a
    noised upload carries K scalars instead of one per local step."""

    def __init__(self, pool_size: int):
        super().__init__("per-seed sums over the seed pool")
        self.pool_size = pool_size

    def view(self, payload: Payload) -> dict[str, torch.Tensor]:
        seeds, values = payload.tensors["seeds"].long(), payload.tensors["values"].float()
        return {"sums": torch.zeros(self.pool_size).index_add_(0, seeds, values)}

    def rebuild(self, payload: Payload, view: dict[str, torch.Tensor]) -> Payload:
        sums = view["sums"]
        return Payload(tensors={"seeds": torch.arange(sums.numel(), dtype=torch.int32), "values": sums.float()},
                       scalars=dict(payload.scalars))

    def dimension(self, server: Any) -> int:
        return self.pool_size


class FedKSeedServer(_FedKSeedRule, HistoryServer):
    server_step_key = "method.fedkseed.global_lr_scale"

    @classmethod
    def update_space(cls, config: Config) -> UpdateSpace | None:
        return SeedSumSpace(method_options(config, "fedkseed", FedKSeedOptions).pool_size)

    def setup(self) -> None:
        super().setup()
        self._setup_rule()
        self.seed_history = SeedHistory.empty(self.pool.size, clip=self.options.pro_clip or None)

    def download(self, rnd: int, client_id: int) -> Payload:
        payload = super().download(rnd, client_id)
        if self.pro:
            payload.tensors["probabilities"] = self.seed_history.probabilities().to(torch.float16)
        return payload

    def catch_up(self, since: int) -> Payload:
        """The missed rounds' updates, or, where those would be larger, the paper's bound: the K
        accumulated sums over the missed rounds (float64), however many rounds were missed."""
        nested = super().catch_up(since)
        nested_bytes = sum(t.numel() * t.element_size() for t in nested.tensors.values())
        if nested_bytes <= 8 * self.pool.size:
            return nested
        return Payload(tensors={MERGED: self.seed_sums(self.history[since:])})

    def check_update(self, reply: Reply) -> None:
        super().check_update(reply)
        tensors, steps = reply.payload.tensors, self.options.local_steps
        validate.check_names(tensors, ("seeds", "values", "step_seeds", "step_g") if self.pro else ("seeds", "values"))
        seeds = validate.check_tensor(tensors, "seeds", torch.int32, ndim=1)
        validate.check_tensor(tensors, "values", torch.float32, shape=tuple(seeds.shape))
        if seeds.numel() > self._max_seeds():
            raise PayloadError(f"{seeds.numel()} seeds where at most {self._max_seeds()} may be sent")
        validate.check_indices(seeds, "seeds", self.pool.size, unique=True)
        if self.pro:
            step_seeds = validate.check_tensor(tensors, "step_seeds", torch.int32, ndim=1)
            validate.check_tensor(tensors, "step_g", torch.float32, shape=tuple(step_seeds.shape))
            if step_seeds.numel() > steps:
                raise PayloadError(f"{step_seeds.numel()} step records from {steps} local steps")
            validate.check_indices(step_seeds, "step_seeds", self.pool.size)
            _check_step_records(seeds, tensors["values"], step_seeds, tensors["step_g"], self.pool.size)

    def update_norm(self, reply: Reply) -> float:
        return robust.l2_norm(reply.payload.tensors, ["values"])

    def _max_seeds(self) -> int:
        """Seeds one upload may name: one per local step, or the whole pool under local DP (the
        noise fills every entry) and under SecAgg (the round's mean arrives dense)."""
        dense = self.config.privacy.dp == "local" or self.config.privacy.secagg
        return self.pool.size if dense else self.options.local_steps

    def upload_bound(self) -> int:
        """An int32 seed index and a float32 sum per seed sent (FedKSeed-Pro: also each step's g)."""
        return 8 * self._max_seeds() * (2 if self.pro else 1)

    def combine(self, rnd: int, replies: list[Reply]) -> tuple[Payload, dict[str, float]]:
        cfg = self.config.method
        total = torch.zeros(self.pool.size, dtype=torch.float64)
        dense, factors = [], []
        for reply, w in zip(replies, self.aggregation_weights(replies)):
            seeds, values = reply.payload.tensors["seeds"].long(), reply.payload.tensors["values"]
            if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= self.pool.size):
                raise PayloadError(f"client {reply.client_id} sent a seed index outside the pool")
            factors.append(self.clip_factor(reply))
            values = values.double() * factors[-1] if factors[-1] < 1.0 else values.double()
            if robust.is_mean(cfg.aggregation):
                total.index_add_(0, seeds, values * w)
            else:
                dense.append(torch.zeros(self.pool.size, dtype=torch.float64).index_add_(0, seeds, values))
            if self.pro:
                steps = reply.payload.tensors["step_seeds"].tolist()
                self.seed_history.record(zip(steps, reply.payload.tensors["step_g"].tolist()))
        if dense:
            total = robust.reduce_stack(torch.stack(dense), cfg.aggregation, cfg.trim_fraction)
        seeds = torch.nonzero(total).view(-1)
        update = Payload(tensors={"seeds": seeds.to(torch.int32), "values": total[seeds].float()})
        metrics = {"seeds_touched": float(seeds.numel())}
        if self.clipping():
            metrics["clipped"] = float(sum(f < 1.0 for f in factors))
        return update, metrics

    def state_dict(self) -> Payload | None:
        state = super().state_dict()
        if state is not None:
            state.tensors["seed_history/abs_sum"] = self.seed_history.abs_sum
            state.tensors["seed_history/count"] = self.seed_history.count
        return state

    def load_state_dict(self, state: Payload) -> None:
        super().load_state_dict(state)
        self.seed_history.abs_sum = state.tensors["seed_history/abs_sum"].clone()
        self.seed_history.count = state.tensors["seed_history/count"].clone()


class FedKSeedClient(_FedKSeedRule, ReplicaClient):
    def __init__(self, ctx):
        super().__init__(ctx)
        self._setup_rule()

    def steps_per_round(self) -> int:
        return self.options.local_steps

    def train_and_encode(self, model, params, rnd, client_id, examples) -> Upload:
        seed = derive_seed(self.config.federation.seed, "local-train", rnd, client_id)
        batches = batch_stream(examples, self.ctx.workbench.tokenizer, self.options.batch_size,
                               self.config.data.max_length, np.random.default_rng(seed))
        probabilities = self._download_probabilities
        result = zo_train(model, list(params.values()), self.pool, _progress(batches, self.ctx.on_step),
                          self.options.local_steps, lr=self.options.lr, eps=self.options.eps,
                          generator=torch_generator(seed, "seeds"), probabilities=probabilities, threads=1)
        seeds, values = result.sparse()
        tensors = {"seeds": seeds.to(torch.int32), "values": values.float()}
        if self.pro:
            tensors["step_seeds"] = torch.tensor([k for k, _ in result.steps], dtype=torch.int32)
            tensors["step_g"] = torch.tensor([g for _, g in result.steps], dtype=torch.float32)
        loss = sum(result.losses) / len(result.losses)
        return Upload(Payload(tensors=tensors), len(examples), {"train_loss": loss})

    def fit(self, rnd, client_id, download, examples, state):
        probabilities = download.tensors.get("probabilities")
        if self.pro and (probabilities is None or probabilities.numel() != self.pool.size):
            raise PayloadError("FedKSeed-Pro download lacks the seed probabilities")
        self._download_probabilities = probabilities.double() if self.pro else None
        return super().fit(rnd, client_id, download, examples, state)


def _progress(batches, on_step):
    """Yield batches, ticking the progress hook as each ZO step starts (one batch per step)."""
    for batch in batches:
        if on_step is not None:
            on_step()
        yield batch


class FedKSeedProServer(FedKSeedServer):
    pro = True
    private_refusal = "its server records every client's per-step |g| in the clear to steer the seed sampling"

    @classmethod
    def update_space(cls, config: Config) -> None:
        return None


class FedKSeedProClient(FedKSeedClient):
    pro = True
