"""HetLoRA (ALGORITHMS.md §7.3): per-client LoRA ranks on FedIT's adapter, sliced down and padded up.

The server holds the global adapter at r_max = `model.lora_rank` (A^g: r_max×din, B^g: dout×r_max;
PEFT's seeded initialisation, B = 0). Client k, of rank r_k (`[method.hetlora] ranks`), downloads
A^g[:r_k] and B^g[:, :r_k] (r_k·(din + dout) values per module), trains only those components (the
rest of its r_max adapter is zero and its gradients are masked), and uploads its A_k and B_k, the
same slices after training. The server weighs each client by the norm of its product,
S_k = ‖B_k·A_k‖_F, w_k = S_k / Σ_j S_j, and sets A^g = Σ w_k·padrows(A_k), B^g = Σ w_k·padcols(B_k).
This is not exact (cross terms; w_k on both factors) and components beyond r_k are diluted by the
lower-rank clients, as the paper's Fig. 2 describes.

Spec choices where the paper (no code) is silent: S_k is taken per module (a client whose update
is large in one layer and small in another gets a weight per layer); the example count does not
enter the weights; one s = alpha / r_max for every rank (the adapter is one PEFT LoRA at r_max);
an all-zero round (Σ S = 0) weighs clients equally. Rank self-pruning is not implemented: ranks stay
as configured. The aggregation weights depend on the uploads' values and the uploads are factors,
not deltas, so this method has no update space for DP or SecAgg.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from thinwire.config import MAX_RANK, method_options, opt
from thinwire.errors import UsageError
from thinwire.methods import robust, validate
from thinwire.methods.base import ClientSide, ClientState, Reply, Upload, WeightsServer, snapshot
from thinwire.wire import Payload, PayloadError


@dataclass
class RankOptions:
    """`[method.hetlora]` and `[method.flora]`: the clients' ranks."""

    ranks: list[int] = opt([], "each client's LoRA rank, in client order and repeated over federation.clients "
                           "(empty: model.lora_rank for every client); each at most model.lora_rank", low=1,
                           high=MAX_RANK)


def _factor(name: str) -> str:
    return "A" if ".lora_A." in name else "B"


@torch.no_grad()
def slice_rank(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The first `rank` components of every factor: A[:rank], B[:, :rank]."""
    return {n: (t[:rank] if _factor(n) == "A" else t[:, :rank]).contiguous() for n, t in tensors.items()}


@torch.no_grad()
def pad_rank(tensors: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Factors of a lower rank, zero-padded to the shapes of `like` (rows of A, columns of B)."""
    out = {}
    for name, ref in like.items():
        padded = torch.zeros(ref.shape, dtype=torch.float32)
        t = tensors[name].float()
        if _factor(name) == "A":
            padded[: t.shape[0]] = t
        else:
            padded[:, : t.shape[1]] = t
        out[name] = padded
    return out


class Ranks:
    lora = True
    options_table = "hetlora"  # the method's `[method.<name>]` table

    def _setup_ranks(self) -> None:
        self.options = method_options(self.config, self.options_table, RankOptions)
        self.r_max = self.config.model.lora_rank
        bad = [r for r in self.options.ranks if not 1 <= r <= self.r_max]
        if bad:
            raise UsageError(f"method.{self.options_table}.ranks has rank {bad[0]} outside "
                             f"[1, model.lora_rank = {self.r_max}]; lower it or raise model.lora_rank "
                             "(the global adapter's rank)")
        method = self.config.method
        if method.server_optimizer != "none" or method.aggregation not in ("mean", "bounded-mean"):
            raise UsageError(f"{method.name} aggregates by its own rule (ALGORITHMS.md §7.3); set "
                             "method.server_optimizer = 'none' and method.aggregation = 'bounded-mean' or 'mean'")

    def product_scales(self, norms: list[float]) -> list[float]:
        """What each client's product B_k A_k is scaled by: under bounded-mean (the default) down to
        `norm_bound_factor` x the round's lower median product norm, so no client's scale or weight
        exceeds an honest one's by more than that; 1 under the plain mean."""
        method = self.config.method
        if method.aggregation != "bounded-mean":
            return [1.0] * len(norms)
        bound = robust.adaptive_bound(norms, method.norm_bound_factor)
        return [min(1.0, bound / n) if n > 0 else 1.0 for n in norms]

    def rank_of(self, client_id: int) -> int:
        ranks = self.options.ranks
        return ranks[client_id % len(ranks)] if ranks else self.r_max


class WeightsCheckpoint:
    """A server whose whole state is `self.weights` (HetLoRA's adapter, FLoRA's merged weights)."""

    weights: dict[str, torch.Tensor]

    def state_dict(self) -> Payload | None:
        return Payload(tensors=self.weights) if hasattr(self, "weights") else None

    def load_state_dict(self, state: Payload) -> None:
        validate.check_like(state.tensors, self.weights)
        self.weights = {k: state.tensors[k].clone() for k in self.weights}


class HetLoRAServer(Ranks, WeightsCheckpoint, WeightsServer):
    private_refusal = "its aggregation weighs each client by its own update's norm (‖B_k A_k‖)"

    def setup(self) -> None:
        self._setup_ranks()
        _, params = self.ctx.workbench.trainable(True)
        self.weights = snapshot(params)

    def download(self, rnd: int, client_id: int) -> Payload:
        rank = self.rank_of(client_id)
        return Payload(tensors=slice_rank(self.weights, rank), scalars={"rank": rank})

    def check_update(self, reply: Reply) -> None:
        validate.check_like(reply.payload.tensors, slice_rank(self.weights, self.rank_of(reply.client_id)))

    @torch.no_grad()
    def aggregate(self, rnd: int, replies: list[Reply]) -> dict[str, float]:
        padded = [pad_rank(r.payload.tensors, self.weights) for r in replies]
        spread = []
        for name in self.weights:
            if _factor(name) != "A":
                continue
            b_name = name.replace(".lora_A.", ".lora_B.")
            norms = [float(torch.linalg.norm(p[b_name].double() @ p[name].double())) for p in padded]
            scales = self.product_scales(norms)
            bounded = [n * c for n, c in zip(norms, scales)]
            total = sum(bounded)
            weights = [s / total for s in bounded] if total > 0 else [1.0 / len(padded)] * len(padded)
            for key in (name, b_name):  # each factor scaled by √c: their product by c
                self.weights[key] = sum(w * math.sqrt(c) * p[key].double()
                                        for w, c, p in zip(weights, scales, padded)).float()
            spread.append(max(weights) - min(weights))
        return {"weight_spread": max(spread)}


class RankClient(Ranks, ClientSide):
    """A client that trains the first r_k components of the r_max adapter (HetLoRA, FLoRA)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self._setup_ranks()

    def received_rank(self, download: Payload) -> int:
        rank = validate.int_scalar(download.scalars, "rank")
        if not 1 <= rank <= self.r_max:
            raise PayloadError(f"rank {rank} outside [1, {self.r_max}]")
        return rank

    def train_slices(self, start: dict[str, torch.Tensor], rank: int, examples: list[dict], rnd: int,
                     client_id: int) -> Upload:
        """Train from factors `start` of rank `rank` (padded into the adapter, the other components
        zero with their gradients masked); upload the trained factors at that rank."""
        model, params = self.ctx.workbench.trainable(True)
        full = {n: p.detach() for n, p in params.items()}
        validate.check_like(start, {n: t.float() for n, t in slice_rank(full, rank).items()})
        with torch.no_grad():
            for name, value in pad_rank(start, full).items():
                params[name].copy_(value)
        masks = pad_rank({n: torch.ones_like(t) for n, t in start.items()}, full)
        hooks = [p.register_hook(lambda g, m=masks[n].to(p.device): g * m) for n, p in params.items()]
        try:
            stats = self.local_train(model, params, examples, rnd, client_id)
        finally:
            for hook in hooks:
                hook.remove()
        trained = slice_rank({n: p.detach().clone() for n, p in params.items()}, rank)
        return Upload(Payload(tensors=trained), len(examples),
                      {"train_loss": stats.loss, "tokens": stats.tokens, "train_s": stats.seconds})


class HetLoRAClient(RankClient):
    def fit(self, rnd: int, client_id: int, download: Payload, examples: list[dict],
            state: ClientState) -> Upload:
        return self.train_slices(download.tensors, self.received_rank(download), examples, rnd, client_id)
