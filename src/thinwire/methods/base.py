"""The small interface every method implements, and the pieces that methods share.

A method is a pair of classes that talk only through `Payload`s:

- `ServerSide` decides what each sampled client downloads this round (it may depend on when the
  client last synced: catch-up) and aggregates the uploads. `setup()` is where a method runs
  anything before federation (a pre-training phase, preparing a server-side model).
- `ClientSide.fit` turns a download plus the client's local examples into an upload. State that
  must survive between a client's rounds lives in that client's `ClientState`, which the runtime
  keeps (in process for the local runtime, in Flower's `Context.state` on Flower), never on the
  `ClientSide` object: a deployment starts a fresh one for every message.

Both sides reach the model through a `Workbench`: one base model and tokenizer per process,
loaded once and reused, so simulating many clients never holds many models.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from thinwire.config import Config
from thinwire.data.template import use_template
from thinwire.methods import robust
from thinwire.methods import validate as checks
from thinwire.models import load_model, trainable_named_parameters, weights_digest
from thinwire.seeding import derive_seed
from thinwire.train.first_order import TrainStats, batch_stream, train_local
from thinwire.wire import Payload, PayloadError

if TYPE_CHECKING:
    from thinwire.methods.space import UpdateSpace


class ClientState(Payload):
    """A client's state between rounds: tensors and scalars, so any runtime can persist it as bytes."""


@dataclass
class Upload:
    payload: Payload
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Reply:
    """An upload as the server received it: decoded from the bytes that crossed the wire."""

    client_id: int
    payload: Payload
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    contributors: int = 1  # clients whose updates it holds: under SecAgg, the round's mean of all


class Workbench:
    """The process's base model and tokenizer, loaded on first use; LoRA wrapping happens once."""

    def __init__(self, config: Config):
        self.config = config
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._lora: torch.nn.Module | None = None

    def _load(self) -> None:
        if self._model is None:
            self._model, self._tokenizer = load_model(self.config.model, self.config.federation.seed)
            use_template(self._tokenizer, self.config.data.template)
            self._base_digest = weights_digest(self._model)

    @property
    def base_digest(self) -> str:
        """`weights_digest` of the base model as loaded (before any training touched it)."""
        self._load()
        return self._base_digest

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        self._load()
        return self._tokenizer

    @property
    def model(self) -> PreTrainedModel:
        """The plain base model, every weight trainable.

        Held in 16 bits, weights would swallow small updates (in bfloat16, 0.05 − 1e-4 rounds back
        to 0.05), so a 16-bit model becomes fp32 master weights whose forward runs in the 16-bit
        dtype under autocast: every optimizer step, ZO step and aggregation applies in fp32.
        (LoRA methods keep the frozen base in 16 bits; peft holds the adapter in fp32.)
        """
        self._load()
        if self._lora is not None:
            raise RuntimeError("this workbench's model is wrapped with LoRA; use lora_model()")
        compute = self._model.dtype
        if compute in (torch.float16, torch.bfloat16):
            self._model.float()
            self._model.forward = torch.autocast(self._model.device.type, dtype=compute)(self._model.forward)
        return self._model

    def lora_model(self) -> torch.nn.Module:
        """The base model wrapped with the configured LoRA adapter (only the adapter trainable)."""
        if self._lora is None:
            from thinwire.models.lora import add_lora

            self._load()
            self._lora = add_lora(self._model, self.config.model, derive_seed(self.config.federation.seed, "lora"))
        return self._lora

    def base_parameters(self) -> int:
        """Unique weights of the base model: what plain FedAvg moves each way per client-round."""
        self._load()
        return sum(p.numel() for name, p in self._model.named_parameters() if "lora_" not in name)

    def trainable(self, lora: bool) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
        model = self.lora_model() if lora else self.model
        return model, trainable_named_parameters(model)


@dataclass
class RunContext:
    """What both sides of a method may use: the config, the workbench and a progress hook."""

    config: Config
    workbench: Workbench
    on_step: Callable[[], None] | None = None
    warnings: list[str] = field(default_factory=list)
    # the clients' example counts as the server knows them (None: unknown), which bound a claim
    partition_sizes: list[int] | None = None
    # workbenches a method stepped away from, by model name (FedPT's devices train a smaller model
    # than the runtime loaded; its server reuses the loaded one instead of loading it twice)
    set_aside: dict[str, Workbench] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        """Say something about the run once: on stderr now, and in the next round's record of
        metrics.jsonl (the runtime drains `warnings`)."""
        if message not in self.warnings:
            self.warnings.append(message)
            print(f"warning: {message}", file=sys.stderr)


class ServerSide(ABC):
    # True where clients rebuild state from seeds shared with the server (bases, perturbations,
    # permutations): every party must then draw the same bits (`seeding.random_fingerprint`)
    needs_shared_draws = False
    # why DP and SecAgg+ refuse this method, where it declares no update space
    private_refusal = "it declares no update space (ServerSide.update_space)"

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.config = ctx.config

    @classmethod
    def update_space(cls, config: Config) -> UpdateSpace | None:
        """Where DP clips and noises an upload and SecAgg+ masks it (methods/space.py); None: this
        method's server needs more than the mean of the uploads, so it runs without either."""
        return None

    @classmethod
    def train_defaults(cls, options: dict[str, Any]) -> dict[str, Any]:
        """`[train]` values this method is meant to run with (its paper's or released code's local
        optimizer), applied where the config does not set the key; `options` holds the validated
        `[method.<name>]` tables. Default: none, the global defaults apply."""
        return {}

    def setup(self) -> None:
        """Runs once before round 1."""

    def phase(self, rnd: int) -> str | None:
        """The name of the phase round `rnd` belongs to, for methods whose rounds differ in kind
        (CG-FedLLM: "tgap" then "faf"); recorded in each round record, and summary.json and the
        report give traffic per phase. Default: None (one kind of round)."""
        return None

    @abstractmethod
    def download(self, rnd: int, client_id: int) -> Payload:
        """What `client_id` receives at the start of round `rnd`."""

    @abstractmethod
    def aggregate(self, rnd: int, replies: list[Reply]) -> dict[str, float]:
        """Fold the round's uploads into the global model; returns metrics to log."""

    @abstractmethod
    def eval_model(self) -> torch.nn.Module:
        """A model that carries the current global weights, ready for evaluation."""

    @abstractmethod
    def final_state(self) -> Payload:
        """The compact global state saved in the run directory (bit-comparable across runs)."""

    @abstractmethod
    def trainable_parameters(self) -> int:
        """How many values the method trains (the size of its update space)."""

    def save_artifacts(self, directory: Path) -> list[str]:
        """Write what a user needs from the run besides `final_state` (a FedPT proxy to generate
        from, a CG-FedLLM autoencoder to reuse) into `directory`; returns the names written."""
        return []

    # -- validation (methods/validate.py): the runtime calls `validate` on every upload ----------

    def validate(self, reply: Reply) -> None:
        """Raise `PayloadError` (with a reason) unless `reply` is safe to aggregate. Never changes state.

        Every method gets: example count, finite metrics, size cap, method checks (`check_update`),
        finite values, values within `[method] max_update_value`, and `[method] max_update_norm` on
        `update_norm`.
        """
        checks.check_reply(reply, self.max_upload_bytes(), self.example_cap())
        self.check_update(reply)
        checks.check_finite(reply.payload.tensors)
        checks.check_magnitude(reply.payload, self.config.method.max_update_value)
        bound = self.config.method.max_update_norm
        if bound > 0:
            norm = self.update_norm(reply)
            if not norm <= bound:
                raise PayloadError(f"update norm {norm:.4g} exceeds method.max_update_norm = {bound:g}")

    def example_cap(self) -> int | None:
        """Most examples a client may claim: `federation.max_examples`, else the largest partition
        the server knows of. With example weighting, an unbounded claim (10^12) would take almost
        all the weight, which no norm cap prevents."""
        if self.config.federation.max_examples > 0:
            return self.config.federation.max_examples
        return max(self.ctx.partition_sizes) if self.ctx.partition_sizes else None

    def aggregation_weights(self, replies: list[Reply]) -> list[float]:
        """Aggregation weights of `replies`: `[method] weighting`, except that example weighting
        falls back to equal weights (said once) when no example count can be bounded."""
        weighting = self.config.method.weighting
        if weighting == "examples" and self.example_cap() is None:
            self.ctx.warn("method.weighting = 'examples' but the server knows no partition sizes to bound a "
                          "client's claimed example count by (set federation.max_examples): weighting equally")
            weighting = "equal"
        return client_weights(replies, weighting)

    def check_update(self, reply: Reply) -> None:
        """Method-specific checks of an upload (names, shapes, dtypes, indices); default: none."""

    def update_norm(self, reply: Reply) -> float:
        """L2 norm of an upload in the method's update space; default: over all floating tensors."""
        return robust.l2_norm(reply.payload.tensors)

    def max_upload_bytes(self) -> int:
        """Most tensor bytes one upload may carry, checked before it is decoded:
        `[method] max_upload_bytes`, else the method's own `upload_bound`."""
        if self.config.method.max_upload_bytes > 0:
            return self.config.method.max_upload_bytes
        return self.upload_bound()

    def upload_bound(self) -> int:
        """What this method can legitimately upload; default: 8 bytes per trained value, plus 1 MiB.
        Methods with compact uploads override it, so a hostile client cannot make the server
        decode a model-sized payload where a real one is a few kilobytes."""
        return 8 * self.trainable_parameters() + (1 << 20)

    # bounded-mean's clip norm for the round being aggregated (None: no adaptive bound); see bound_round
    round_norm_bound: float | None = None

    def bound_round(self, replies: list[Reply]) -> dict[int, float]:
        """Set `round_norm_bound` from `replies` (bounded-mean: `robust.adaptive_bound` of their
        update norms; otherwise None) and return each client's update norm as the server measured
        it (an update whose norm cannot be measured counts as infinite: clipped to nothing)."""
        self.round_norm_bound = None
        method = self.config.method
        if method.aggregation != "bounded-mean" or not replies:
            return {}
        norms = {}
        for reply in replies:
            try:
                norm = self.update_norm(reply)
            except Exception:  # noqa: BLE001 -- validated already; a norm that still fails weighs nothing
                norm = math.inf
            norms[reply.client_id] = math.inf if math.isnan(norm) else norm
        self.round_norm_bound = robust.adaptive_bound(list(norms.values()), method.norm_bound_factor)
        return norms

    def clipping(self) -> bool:
        """Whether this round's updates are clipped (`clip_update_norm` or bounded-mean's bound)."""
        return self.config.method.clip_update_norm > 0 or self.round_norm_bound is not None

    def clip_factor(self, reply: Reply) -> float:
        """What this upload is multiplied by: the smaller of `[method] clip_update_norm` and the
        round's adaptive bound over its norm (1 when both are off or the norm is within)."""
        bounds = [b for b in (self.config.method.clip_update_norm, self.round_norm_bound) if b is not None and b > 0]
        if self.round_norm_bound == 0:
            bounds.append(0.0)
        if not bounds:
            return 1.0
        bound, norm = min(bounds), self.update_norm(reply)
        if norm <= bound:
            return 1.0
        return bound / norm if math.isfinite(norm) else 0.0

    # -- checkpointing (runtime/checkpoint.py) --------------------------------------------------

    def state_dict(self) -> Payload | None:
        """Everything `load_state_dict` needs to continue the run exactly; None: not resumable.

        The tensors may be the live ones (no copy of the model is made): encode the payload before
        the server changes again."""
        return None

    def load_state_dict(self, state: Payload) -> None:
        """Restore what `state_dict` returned, after `setup()`."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume from a checkpoint")


class WeightsServer(ServerSide):
    """A server whose global state is `self.weights`, the trainable tensors by name."""

    lora = False
    weights: dict[str, torch.Tensor]

    def eval_model(self) -> torch.nn.Module:
        model, params = self.ctx.workbench.trainable(self.lora)
        load_into(params, self.weights)
        return model

    def final_state(self) -> Payload:
        return Payload(tensors=self.weights)

    def trainable_parameters(self) -> int:
        return sum(t.numel() for t in self.weights.values())


class ClientSide(ABC):
    # ClientState tensors under these prefixes are the same for every client that holds them (a
    # downloaded public artifact) and are only ever replaced, never modified in place: a runtime
    # that keeps many clients' states in one process may keep one copy of them
    shared_state_prefixes: tuple[str, ...] = ()

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.config = ctx.config

    def steps_per_round(self) -> int:
        """Local steps per round, for progress display."""
        return self.config.train.local_steps

    @abstractmethod
    def fit(self, rnd: int, client_id: int, download: Payload, examples: list[dict],
            state: ClientState) -> Upload:
        """One round of local work."""

    def state_dict(self) -> Payload | None:
        """State this object keeps across clients and rounds (a shared replica), for checkpoints;
        None: nothing (per-client state belongs in `ClientState`, which the runtime keeps)."""
        return None

    def load_state_dict(self, state: Payload) -> None:
        """Restore what `state_dict` returned."""

    def local_train(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                    examples: list[dict], rnd: int, client_id: int) -> TrainStats:
        """First-order local training; batches and dropout draw from a (seed, round, client) stream."""
        seed = derive_seed(self.config.federation.seed, "local-train", rnd, client_id)
        batches = batch_stream(examples, self.ctx.workbench.tokenizer, self.config.train.batch_size,
                               self.config.data.max_length, np.random.default_rng(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return train_local(model, list(params.values()), batches, self.config.train, self.ctx.on_step)


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


@torch.no_grad()
def load_into(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Copy received tensors into the model's parameters, insisting on the same names and shapes."""
    check_tensors(tensors, params)
    for name, p in params.items():
        p.copy_(tensors[name])


def check_tensors(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Same names, shapes and finite values as `reference`, or a PayloadError saying which."""
    if set(tensors) != set(reference):
        missing, extra = set(reference) - set(tensors), set(tensors) - set(reference)
        raise PayloadError(f"tensor names differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for name, ref in reference.items():
        if tensors[name].shape != ref.shape:
            raise PayloadError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(ref.shape)}")
        if tensors[name].is_floating_point() and not torch.isfinite(tensors[name]).all():
            raise PayloadError(f"tensor {name!r} has non-finite values")


def client_weights(replies: list[Reply], weighting: str) -> list[float]:
    """Normalised aggregation weights: by example count (FedAvg) or equal."""
    raw = [float(r.num_examples) if weighting == "examples" else 1.0 for r in replies]
    total = sum(raw)
    return [w / total for w in raw]
