"""FedAvg (all weights) and FedIT (LoRA adapter): clients upload Δ = w_start − w_end, the server
applies the weighted mean Δ through its optimizer.

FedIT averages A and B separately: with a shared start, mean(start − end) = start − mean(end),
so one delta rule serves both (mean(B·A) ≠ mean(B)·mean(A) is the known FedIT property).
"""

from __future__ import annotations

import torch

from thinwire.methods import robust, validate
from thinwire.methods.base import (
    ClientSide,
    ClientState,
    Reply,
    WeightsServer,
    Upload,
    check_tensors,
    load_into,
    snapshot,
)
from thinwire.methods.server_opt import ServerOptimizer
from thinwire.methods.space import UpdateSpace
from thinwire.wire import Payload


class DeltaServer(WeightsServer):
    lora = False

    @classmethod
    def update_space(cls, config) -> UpdateSpace | None:
        return UpdateSpace("LoRA delta (A and B)" if cls.lora else "weight delta")

    def setup(self) -> None:
        _, params = self.ctx.workbench.trainable(self.lora)
        self.weights = snapshot(params)
        self.optimizer = ServerOptimizer(self.config.method)

    def download(self, rnd: int, client_id: int) -> Payload:
        return Payload(tensors=self.weights)

    def aggregate(self, rnd: int, replies: list[Reply]) -> dict[str, float]:
        for reply in replies:
            check_tensors(reply.payload.tensors, self.weights)
        cfg = self.config.method
        weights = self.aggregation_weights(replies)
        factors = [self.clip_factor(r) for r in replies]
        updates = [robust.scale(r.payload.tensors, f) for r, f in zip(replies, factors)]
        mean = robust.combine_tensors(updates, weights, cfg.aggregation, cfg.trim_fraction)
        metrics = self.optimizer.step(self.weights, mean, updates, weights)
        metrics["update_norm"] = robust.l2_norm(mean, self.weights)
        if self.clipping():
            metrics["clipped"] = float(sum(f < 1.0 for f in factors))
        return metrics

    def check_update(self, reply: Reply) -> None:
        # A subclass with its own upload format (its own `aggregate`) checks it in its own override.
        if type(self).aggregate is DeltaServer.aggregate:
            validate.check_like(reply.payload.tensors, self.weights)

    def update_norm(self, reply: Reply) -> float:
        if type(self).aggregate is not DeltaServer.aggregate:
            return super().update_norm(reply)
        return robust.l2_norm(reply.payload.tensors, self.weights)

    def state_dict(self) -> Payload | None:
        if not hasattr(self, "weights"):
            return None
        if type(self).aggregate is not DeltaServer.aggregate and type(self).state_dict is DeltaServer.state_dict:
            return None  # a subclass with its own aggregate may keep state we do not know: not resumable
        tensors = {f"w/{k}": t for k, t in self.weights.items()}
        tensors.update({f"m/{k}": t for k, t in self.optimizer.m.items()})
        tensors.update({f"v/{k}": t for k, t in self.optimizer.v.items()})
        return Payload(tensors=tensors)

    @torch.no_grad()
    def load_state_dict(self, state: Payload) -> None:
        part = lambda prefix: {k[len(prefix):]: t for k, t in state.tensors.items() if k.startswith(prefix)}  # noqa: E731
        saved = part("w/")
        check_tensors(saved, self.weights)
        for name, weight in self.weights.items():
            weight.copy_(saved[name])
        device = next(iter(self.weights.values())).device if self.weights else "cpu"
        self.optimizer.m = {k: t.to(device) for k, t in sorted(part("m/").items())}
        self.optimizer.v = {k: t.to(device) for k, t in sorted(part("v/").items())}


class DeltaClient(ClientSide):
    lora = False

    def fit(self, rnd: int, client_id: int, download: Payload, examples: list[dict],
            state: ClientState) -> Upload:
        model, params = self.ctx.workbench.trainable(self.lora)
        load_into(params, download.tensors)
        start = snapshot(params)
        stats = self.local_train(model, params, examples, rnd, client_id)
        delta = {name: start[name] - p.detach() for name, p in params.items()}
        return Upload(Payload(tensors=delta), len(examples),
                      {"train_loss": stats.loss, "tokens": stats.tokens, "train_s": stats.seconds})


class FedITServer(DeltaServer):
    lora = True


class FedITClient(DeltaClient):
    lora = True
