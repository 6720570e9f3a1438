"""FLoRA (ALGORITHMS.md §7.3, code ATP-1010/FederatedLLM): per-client ranks whose factors are
stacked and merged into the base weights every round.

Each round client k loads the merged target weights W it downloads into its base layers, builds a
fresh adapter of rank r_k (`[method.flora] ranks`; A drawn as PEFT does, U(±1/√din), from the
stream (seed, round, client, module); B = 0), trains it and uploads A_k and B_k
(r_k·(din + dout) per module). The server stacks A_st = [p_1·A_1; …; p_K·A_K] and
B_st = [B_1 … B_K] (p_k by `method.weighting`, on A only), so B_st·A_st = Σ p_k·B_k·A_k exactly,
and merges W ← W + s·B_st·A_st (computed in float64, kept in float32 master weights: merging into
a 16-bit base every round would accumulate rounding). The stack is merged every round and never
kept, so the adapter's rank never grows (the code's pitfall, issue #10).

Downlink: the merged dense W of every target module (din·dout values each), which is what the
code's clients load (merge_and_unload) and what a client that missed rounds needs; it is counted
as sent. Sending the round's stack instead (Σ r_k·(din + dout)) is cheaper when Σ r_k is small but
needs every client to replay every round it missed; not implemented.

Spec choices: one scale s = `model.lora_alpha / model.lora_rank` for every rank (the code's
α_k = 2·r_k is s = 2: set model.lora_alpha = 2·model.lora_rank); ranks at most model.lora_rank.
The final state is the whole merged model (export: a Hugging Face model directory). The update
space of a client is its (A_k, B_k) pair, whose product, not sum, is aggregated: no DP or SecAgg.
"""

from __future__ import annotations

import torch

from thinwire.methods import validate
from thinwire.methods.base import ClientState, Reply, Upload, WeightsServer
from thinwire.methods.hetlora import (  # noqa: F401 (RankOptions: the registry's options class)
    RankClient,
    RankOptions,
    Ranks,
    WeightsCheckpoint,
    slice_rank,
)
from thinwire.models.lora import ADAPTER, lora_layers, peft_a_draw
from thinwire.wire import Payload, PayloadError


@torch.no_grad()
def load_base(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy the merged target weights ("W/<module>") into the adapted layers' base weights."""
    for name, layer in lora_layers(model).items():
        layer.base_layer.weight.copy_(weights[f"W/{name}"])


def _meta_like(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: torch.empty(t.shape, dtype=torch.float32, device="meta") for n, t in tensors.items()}


class _Merged(Ranks):
    options_table = "flora"

    def _setup_merged(self) -> None:
        self._setup_ranks()
        self.model = self.ctx.workbench.lora_model()
        self.layers = lora_layers(self.model)
        self.adapter = _meta_like(self.ctx.workbench.trainable(True)[1])
        self.base_shapes = {f"W/{n}": torch.empty(layer.base_layer.weight.shape, device="meta")
                            for n, layer in self.layers.items()}


class FLoRAServer(_Merged, WeightsCheckpoint, WeightsServer):
    private_refusal = "its server multiplies each client's own factors (B_k A_k), not a sum of uploads"

    def setup(self) -> None:
        self._setup_merged()
        self.weights = {f"W/{n}": layer.base_layer.weight.detach().float().clone() for n, layer in self.layers.items()}

    def download(self, rnd: int, client_id: int) -> Payload:
        return Payload(tensors=self.weights, scalars={"rank": self.rank_of(client_id)})

    def trainable_parameters(self) -> int:
        """Values a client trains at most (its adapter at r_max); the merged W changes in full."""
        return sum(t.numel() for t in self.adapter.values())

    def check_update(self, reply: Reply) -> None:
        validate.check_like(reply.payload.tensors, slice_rank(self.adapter, self.rank_of(reply.client_id)))

    def update_norm(self, reply: Reply) -> float:
        """‖s·B_k·A_k‖_F over the modules: the change the upload makes to the base."""
        tensors = reply.payload.tensors
        return sum(float(torch.linalg.norm(self._product(tensors, n))) ** 2 for n in self.layers) ** 0.5

    def _product(self, tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
        a, b = tensors[f"{module}.lora_A.{ADAPTER}.weight"], tensors[f"{module}.lora_B.{ADAPTER}.weight"]
        return float(self.layers[module].scaling[ADAPTER]) * (b.double() @ a.double())

    @torch.no_grad()
    def aggregate(self, rnd: int, replies: list[Reply]) -> dict[str, float]:
        p = self.aggregation_weights(replies)
        for name in self.layers:
            a_list = [r.payload.tensors[f"{name}.lora_A.{ADAPTER}.weight"].double() for r in replies]
            b_list = [r.payload.tensors[f"{name}.lora_B.{ADAPTER}.weight"].double() for r in replies]
            scales = self.product_scales([float(torch.linalg.norm(b @ a)) for a, b in zip(a_list, b_list)])
            a_stack = torch.cat([pk * c * a for pk, c, a in zip(p, scales, a_list)])
            b_stack = torch.cat(b_list, dim=1)
            merged = float(self.layers[name].scaling[ADAPTER]) * (b_stack @ a_stack)
            self.weights[f"W/{name}"] = (self.weights[f"W/{name}"].double() + merged).float()
        return {"stack_rank": float(a_stack.shape[0])}

    @torch.no_grad()
    def eval_model(self) -> torch.nn.Module:
        """The merged model: W in the base layers, every B zero (a fresh adapter adds nothing)."""
        load_base(self.model, self.weights)
        for layer in self.layers.values():
            layer.lora_B[ADAPTER].weight.zero_()
        return self.model

    def final_state(self) -> Payload:
        """The whole merged model under its plain (unwrapped) parameter names."""
        merged = {f"{n}.base_layer.weight": self.weights[f"W/{n}"] for n in self.layers}
        tensors = {}
        for name, p in self.model.named_parameters():
            if "lora_" not in name:
                plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
                tensors[plain] = merged.get(name, p.detach())
        return Payload(tensors=tensors)


class FLoRAClient(_Merged, RankClient):
    def __init__(self, ctx):
        super().__init__(ctx)
        self._setup_merged()

    def fit(self, rnd: int, client_id: int, download: Payload, examples: list[dict],
            state: ClientState) -> Upload:
        rank = self.received_rank(download)
        validate.check_like(download.tensors, self.base_shapes)
        load_base(self.model, download.tensors)
        seed = self.config.federation.seed
        fresh = {}
        for name, t in slice_rank(self.adapter, rank).items():
            module = name.split(".lora_", 1)[0]
            fresh[name] = (peft_a_draw(tuple(t.shape), seed, "flora-A", rnd, client_id, module) if ".lora_A." in name
                           else torch.zeros(t.shape))
        if not fresh:
            raise PayloadError("FLoRA: the model has no adapted layers")
        return self.train_slices(fresh, rank, examples, rnd, client_id)
