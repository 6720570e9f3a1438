"""FedAvg (all weights) and FedIT (LoRA adapter): clients upload Δ = w_start − w_end, the server
applies the weighted mean Δ through its optimizer.

FedIT averages A and B separately: with a shared start, mean(start − end) = start − mean(end),
so one delta rule serves both (mean(B·A) ≠ mean(B)·mean(A) is the known FedIT property).
"""

from __future__ import annotations

import torch

from thinwire.methods.aggregate import weighted_mean
from thinwire.methods.base import (
    ClientSide,
    ClientState,
    Reply,
    ServerSide,
    Upload,
    check_tensors,
    client_weights,
    load_into,
    snapshot,
)
from thinwire.methods.server_opt import ServerOptimizer
from thinwire.wire import Payload


class DeltaServer(ServerSide):
    lora = False

    def setup(self) -> None:
        _, params = self.ctx.workbench.trainable(self.lora)
        self.weights = snapshot(params)
        self.optimizer = ServerOptimizer(self.config.method)

    def download(self, rnd: int, client_id: int) -> Payload:
        return Payload(tensors=self.weights)

    def aggregate(self, rnd: int, replies: list[Reply]) -> dict[str, float]:
        for reply in replies:
            check_tensors(reply.payload.tensors, self.weights)
        weights = client_weights(replies, self.config.method.weighting)
        mean = weighted_mean([r.payload.tensors for r in replies], weights)
        self.optimizer.step(self.weights, mean)
        return {"update_norm": float(torch.sqrt(sum((d.float() ** 2).sum() for d in mean.values())))}

    def eval_model(self) -> torch.nn.Module:
        model, params = self.ctx.workbench.trainable(self.lora)
        load_into(params, self.weights)
        return model

    def final_state(self) -> Payload:
        return Payload(tensors=self.weights)

    def trainable_parameters(self) -> int:
        return sum(t.numel() for t in self.weights.values())


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
