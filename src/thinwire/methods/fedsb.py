"""Fed-SB (ALGORITHMS.md §7.2): LoRA-SB's ΔW = s·B·R·A with A and B frozen after an SVD
initialisation; only R (r×r per module) trains and travels, and its weighted mean is exact:
B·(Σ p_k·R_k)·A = Σ p_k·B·R_k·A.

Rounds, as phases of one run (each round record's `phase`; summary.json gives traffic per phase):

* ``init`` (round 1, and the next ones while it is skipped): thinwire's config holds no
  server-side data, so the LoRA-SB gradient is federated. Each sampled client uploads
  G_k = Σ_b ∇_W L_b over its first `init_examples` examples (seeded shuffle, `train.batch_size`
  per batch; the released code's G on the pooled set), per target module, dense (dout·din
  float32 values), with the adapter off (the gradient at W0). The server takes the weighted mean
  G, ΔW1 = −η1·sign(G) (Adam's first step; η1 = `train.lr`: thinwire has no warmup, so the
  code's lr/(warmup_ratio·T) is the first step's lr), and per module the rank-r randomized SVD of
  ΔW1ᵀ (torch.svd_lowrank, `svd_iters` power iterations, its global RNG forked and seeded from
  (run seed, module), never left reseeded): A = Uᵀ, B = V, R0 = diag(σ)/s, so s·B·R0·A is the
  rank-r truncation of ΔW1 at any `model.lora_alpha` (the code fixes α = r, s = 1). W0 is not
  compensated: the model after round 1 is W0 + ΔW1,r, as in the code. A, B, R0 stay float32 (the
  code casts them to bf16 for its bf16 models).

  Privacy cost: this round sends each sampled client's raw gradient of every target matrix on
  `init_examples` examples, the most revealing thing a client ever sends in thinwire (gradient
  inversion reconstructs text from such gradients). The released code's DP runs compute it on
  raw data outside ε. Here, under DP, it is clipped and noised like any upload (`FedSBSpace`) and
  counted as a release; under SecAgg+ the server sees only the gradients' sum.
* ``train`` (the rest): a client's first download after the init carries A and B (r·(din+dout)
  per module, counted as downlink) and the client keeps them in its ClientState; the server sends
  them again until an aggregated reply from that client shows it holds them. Every download
  carries R, every upload ΔR = R_start − R_end; the server applies the weighted mean of this
  round's ΔR through the server optimizer (R ← Σ p_k·R_k with the defaults). Only this round's
  uploads enter it: the authors' multi-round script kept averaging every earlier round's R too.

The rank is `model.lora_rank` (r² values per module each way): the one LoRA rank thinwire has,
so the export is an ordinary PEFT adapter (lora_A = R·A, lora_B = B) at that rank.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from thinwire.config import MAX_EXAMPLES, MAX_STEPS, Config, method_options, opt
from thinwire.errors import UsageError
from thinwire.methods import robust, validate
from thinwire.methods.base import ClientState, Reply, Upload, snapshot
from thinwire.methods.fedavg import DeltaServer, FedITClient
from thinwire.methods.server_opt import ServerOptimizer
from thinwire.methods.space import UpdateSpace
from thinwire.models.lora import ADAPTER, lora_layers
from thinwire.seeding import derive_seed
from thinwire.train.first_order import batch_stream
from thinwire.wire import Payload, PayloadError

INIT, TRAIN = "init", "train"
FACTORS = "factors/"  # A and B inside a ClientState


@dataclass
class FedSBOptions:
    """`[method.fed-sb]`. The rank is `model.lora_rank` (r² values per module each way)."""

    init_examples: int = opt(50, "examples per client whose gradient initialises A, B, R0 in the init round "
                             "(the code's N: 50 pooled on its arithmetic runs)", low=1, high=MAX_EXAMPLES)
    svd_iters: int = opt(10, "power iterations of the randomized SVD (torch.svd_lowrank niter; the code's 10)",
                         low=0, high=MAX_STEPS)


class SBProjection(torch.nn.Module):
    """A Fed-SB layer's lora_A: x ↦ R·(A·x), A frozen, R trained; `weight` (R·A) serves peft's merges."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("A", a.detach().clone())
        self.R = torch.nn.Parameter(torch.zeros(a.shape[0], a.shape[0], dtype=a.dtype, device=a.device))

    @property
    def weight(self) -> torch.Tensor:
        return self.R @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.R)


def factor_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int, int, float]]:
    """module -> (r, din, dout, s) of every adapted layer."""
    return {name: (layer.r[ADAPTER], layer.in_features, layer.out_features, float(layer.scaling[ADAPTER]))
            for name, layer in lora_layers(model).items()}


def r_name(module: str) -> str:
    return f"{module}.lora_A.{ADAPTER}.R"


@torch.no_grad()
def install(model: torch.nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Make every adapted layer of `model` compute s·B·R·A with these frozen A ("A/<module>") and
    B ("B/<module>"); R keeps its value where the layer already had one."""
    for name, layer in lora_layers(model).items():
        r, din, dout = layer.r[ADAPTER], layer.in_features, layer.out_features
        a, b = factors.get(f"A/{name}"), factors.get(f"B/{name}")
        if a is None or b is None or tuple(a.shape) != (r, din) or tuple(b.shape) != (dout, r):
            raise PayloadError(f"Fed-SB factors for {name[:60]!r} are missing or not ({r}, {din}) and ({dout}, {r})")
        lin_b = layer.lora_B[ADAPTER]
        proj = layer.lora_A[ADAPTER]
        if not isinstance(proj, SBProjection):
            proj = layer.lora_A[ADAPTER] = SBProjection(a.to(lin_b.weight.device, lin_b.weight.dtype))
        proj.A.copy_(a)
        lin_b.weight.copy_(b)
        lin_b.weight.requires_grad_(False)


def init_gradient(model: torch.nn.Module, examples: list[dict], tokenizer, config, count: int,
                  seed: int) -> dict[str, torch.Tensor]:
    """Σ_b ∇_W L_b of every adapted layer's base weight at W0 (adapter off), over the first `count`
    of `examples` in a seeded order, `train.batch_size` per batch."""
    layers = lora_layers(model)
    weights = {name: layer.base_layer.weight for name, layer in layers.items()}
    batch_size = config.train.batch_size
    batches = batch_stream(examples, tokenizer, batch_size, config.data.max_length, np.random.default_rng(seed))
    device = next(model.parameters()).device
    model.train()
    try:
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        with model.disable_adapter(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(math.ceil(min(count, len(examples)) / batch_size)):
                batch = {k: v.to(device) for k, v in next(batches).items()}
                model(**batch).loss.backward()
        return {f"G/{name}": w.grad.detach().float().cpu() for name, w in weights.items()}
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None


@torch.no_grad()
def sb_factors(step: torch.Tensor, rank: int, scale: float, iters: int, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, R0) with s·B·R0·A the rank-`rank` randomized SVD of `step` (dout×din), as LoRA-SB
    computes it: U, σ, V = svd_lowrank(stepᵀ); A = Uᵀ, B = V, R0 = diag(σ)/s."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, sigma, v = torch.svd_lowrank(step.T.float(), q=rank, niter=iters)
    return u.T.contiguous(), v.contiguous(), torch.diag(sigma / scale)


class _Rule:
    def _setup_rule(self) -> None:
        self.options = method_options(self.config, "fed-sb", FedSBOptions)
        self.model = self.ctx.workbench.lora_model()
        self.shapes = factor_shapes(self.model)


class FedSBSpace(UpdateSpace):
    """The uploaded tensors: each target matrix's gradient G in the init round, ΔR after. Under DP
    both are clipped to privacy.clip_norm and noised, and the init round is a release like any."""

    def __init__(self):
        super().__init__("gradients G in the init round, then the R delta (r x r per module)")

    def dimension(self, server: Any) -> int:
        if server.ready_round is None:
            return sum(din * dout for _, din, dout, _ in server.shapes.values())
        return server.trainable_parameters()


class FedSBServer(_Rule, DeltaServer):
    lora = True

    @classmethod
    def update_space(cls, config: Config) -> UpdateSpace | None:
        return FedSBSpace()

    def setup(self) -> None:
        self._setup_rule()
        small = [(n, din, dout) for n, (r, din, dout, _) in self.shapes.items() if r > min(din, dout)]
        if small:
            name, din, dout = small[0]
            raise UsageError(f"fed-sb: model.lora_rank = {self.config.model.lora_rank} exceeds the rank of {name!r} "
                             f"({dout}x{din}), which its SVD initialisation cannot fill; lower model.lora_rank")
        self.optimizer = ServerOptimizer(self.config.method)
        self.weights: dict[str, torch.Tensor] = {}  # R per module, from the init round on
        self.factors: dict[str, torch.Tensor] = {}  # "A/<module>", "B/<module>"
        self.ready_round: int | None = None  # the round whose aggregate computed the factors
        self.holders: set[int] = set()  # clients known to hold the factors

    def phase(self, rnd: int) -> str:
        return INIT if self.ready_round is None or rnd <= self.ready_round else TRAIN

    def download(self, rnd: int, client_id: int) -> Payload:
        if self.ready_round is None:
            return Payload(scalars={"phase": INIT})
        tensors = dict(self.weights)
        if client_id not in self.holders:
            tensors.update(self.factors)
        return Payload(tensors=tensors, scalars={"phase": TRAIN})

    def trainable_parameters(self) -> int:
        return sum(r * r for r, _, _, _ in self.shapes.values())

    def upload_bound(self) -> int:
        if self.ready_round is None:  # the init round's dense gradients
            return 8 * sum(din * dout for _, din, dout, _ in self.shapes.values()) + (1 << 20)
        return super().upload_bound()

    def _gradient_reference(self) -> dict[str, torch.Tensor]:
        return {f"G/{name}": torch.empty(dout, din, device="meta") for name, (_, din, dout, _) in self.shapes.items()}

    def check_update(self, reply: Reply) -> None:
        validate.check_like(reply.payload.tensors, self._gradient_reference() if self.ready_round is None
                            else self.weights)

    def aggregate(self, rnd: int, replies: list[Reply]) -> dict[str, float]:
        if self.ready_round is None:
            return self._initialise(rnd, replies)
        for reply in replies:
            self.holders.add(reply.client_id)
        return super().aggregate(rnd, replies)

    @torch.no_grad()
    def _initialise(self, rnd: int, replies: list[Reply]) -> dict[str, float]:
        cfg = self.config.method
        gradient = robust.combine_tensors([r.payload.tensors for r in replies], self.aggregation_weights(replies),
                                          cfg.aggregation, cfg.trim_fraction)
        for name, (rank, _, _, scale) in self.shapes.items():
            step = -self.config.train.lr * torch.sign(gradient[f"G/{name}"])
            a, b, r0 = sb_factors(step, rank, scale, self.options.svd_iters,
                                  derive_seed(self.config.federation.seed, "fed-sb-svd", name))
            self.factors[f"A/{name}"], self.factors[f"B/{name}"] = a, b
            self.weights[r_name(name)] = r0
        self.ready_round = rnd
        install(self.model, self.factors)
        return {"init_gradient_norm": robust.l2_norm(gradient)}

    def eval_model(self) -> torch.nn.Module:
        if self.ready_round is None:
            return self.model  # the adapter's B is 0: the base model
        install(self.model, self.factors)
        return super().eval_model()

    def final_state(self) -> Payload:
        """The adapter as a plain PEFT LoRA (lora_A = R·A, lora_B = B), which export writes as is."""
        if self.ready_round is None:
            return Payload(tensors=snapshot(self.ctx.workbench.trainable(True)[1]))
        tensors = {}
        for name in self.shapes:
            tensors[f"{name}.lora_A.{ADAPTER}.weight"] = self.weights[r_name(name)] @ self.factors[f"A/{name}"]
            tensors[f"{name}.lora_B.{ADAPTER}.weight"] = self.factors[f"B/{name}"]
        return Payload(tensors=tensors)

    def state_dict(self) -> Payload | None:
        state = super().state_dict()  # R and the server optimizer's moments
        if state is None:
            return None
        state.tensors.update(self.factors)
        state.scalars.update({"ready_round": self.ready_round or 0, "holders": json.dumps(sorted(self.holders))})
        return state

    def load_state_dict(self, state: Payload) -> None:
        self.ready_round = int(state.scalars["ready_round"]) or None
        self.holders = set(json.loads(str(state.scalars["holders"])))
        self.factors = {k: t for k, t in state.tensors.items() if k.startswith(("A/", "B/"))}
        self.weights = {k[2:]: torch.empty_like(t) for k, t in state.tensors.items() if k.startswith("w/")}
        super().load_state_dict(state)
        if self.ready_round is not None:
            install(self.model, self.factors)


class FedSBClient(_Rule, FedITClient):
    shared_state_prefixes = (FACTORS,)  # A and B: one copy for all clients in one process

    def __init__(self, ctx):
        super().__init__(ctx)
        self._setup_rule()

    def fit(self, rnd: int, client_id: int, download: Payload, examples: list[dict],
            state: ClientState) -> Upload:
        phase = str(download.scalars.get("phase"))
        if phase == INIT:
            seed = derive_seed(self.config.federation.seed, "fed-sb-init", client_id)
            count = min(self.options.init_examples, len(examples))
            grads = init_gradient(self.model, examples, self.ctx.workbench.tokenizer, self.config, count, seed)
            return Upload(Payload(tensors=grads), count)
        if phase != TRAIN:
            raise PayloadError(f"unknown Fed-SB phase {phase[:20]!r}")
        sent = {k: t for k, t in download.tensors.items() if k.startswith(("A/", "B/"))}
        if sent:
            state.tensors = {k: t for k, t in state.tensors.items() if not k.startswith(FACTORS)}
            state.tensors.update({FACTORS + k: t.clone() for k, t in sent.items()})
        factors = {k[len(FACTORS):]: t for k, t in state.tensors.items() if k.startswith(FACTORS)}
        if not factors:
            raise PayloadError("this client holds no Fed-SB factors and its download carried none")
        install(self.model, factors)  # the trainable set is now R alone: FedIT's delta client trains it
        r_only = Payload(tensors={k: t for k, t in download.tensors.items() if k not in sent})
        return super().fit(rnd, client_id, r_only, examples, state)
