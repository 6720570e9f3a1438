"""FedPT (ALGORITHMS.md §5): devices federate-tune a small model (FedIT, LoRA); the server
proxy-tunes a large black-box model with it and distils the result back into the small adapter.

Per round: broadcast the small model's LoRA adapter (FedIT downlink) → clients tune it locally
(FedIT client, unchanged) → FedIT aggregation → the proxy-tuned large model scores every context as
z_large + α (z_small_tuned − z_anti) → (distill = true) knowledge distillation from that proxy into
the aggregated adapter, which is next round's broadcast. `distill = false` is the paper's
FedAvg+PT baseline: plain FedIT, proxy-tuned at evaluation.

Which model is which (`pair`): with `large` unset (the default), `model.name` may name a built-in
large model, whose built-in small pair the devices then train (`tiny` -> `tiny-small`,
`smollm2-135m` -> `smollm2-small`), or a built-in small model, whose pair is then the large one;
so `--set method.name=fedpt` works on any config of a built-in model, and `model.name =
"smollm2-small"` (the headline's) means the same pair. With `large` set, `model.name` is the
device model, whatever it is; the two must share a tokenizer and vocabulary (a clear error if
not). The run's workbench is swapped for one over the small model when `model.name` is the large
one (`use_small_workbench`), so devices only ever load the small model, and the server reuses the
runtime's already loaded large model as the black box.

The large model is reached only through a `LogitsProvider` (next-token logits, models/logits.py);
the built-in one wraps a local HF model named by `large`. Replace `server.large_provider` after
`setup()` to use a remote service. `eval_model()` is the proxy-tuned large model (proxy.py), with
the aggregated (pre-distillation) adapter of the last round as expert; before round 1 the expert
equals the pretrained small model, so the proxy is exactly the large model.

Choices the paper leaves open, as implemented:
- anti-expert: `anti = "pretrained"` (the paper's figure: the small model with its adapter
  disabled), `"broadcast"` (the adapter this round's clients started from, so after
  distillation the large model's prior is not added twice, but only the last round's tuning is
  left in the proxy) or `"distilled"`: an adapter of its own that the server distils, each
  round, from the large model alone on the same distillation batches, steps and learning rate as
  the expert's. Why: after distillation the expert's small model carries the large model's prior
  as well as the tuning, so subtracting the pretrained small model counts that prior twice;
  subtracting a small model distilled the same way from the untuned large model leaves
  (ideally) only the tuning, all rounds of it, while clients still train a small model that
  behaves like the proxy on the server's prompts.
- distillation data (`kd_prompts = "suite"`): every round `kd_examples` fresh prompts from the
  built-in task suite, drawn from the run's own training families (`data.tasks`, or all 42
  families when the data is not the suite; `data.heldout_tasks` excluded), with a seed of their own
  (so other inputs than the clients' examples, but the same instructions), rendered with the
  Alpaca template. The server therefore knows the task families the devices train on: it holds
  unlabelled prompts of the same families, and with `kd_targets = "reference"` their answers. `kd_targets = "generated"` (default): the continuations are
  the proxy model's own greedy outputs (≤ `kd_max_new_tokens`), so the server needs no labels;
  `"reference"`: teacher-forced on the suite's reference outputs (the server holds labelled
  public data).
- loss: KL at temperature `kd_temperature` (× T²) on the response positions only, forward
  KL(proxy ‖ student) (mode-covering, the classic KD) or reverse KL(student ‖ proxy)
  (`kd_direction`). The teacher is fixed within a round (its log-probs are computed once);
  `kd_steps` AdamW steps (`kd_lr`) over batches of `kd_batch_size`, on the LoRA adapter only.
  Each round logs that loss over all distillation positions before and after (`kd_kl_before`,
  `kd_kl_after`): whether the student moved toward the teacher.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from thinwire.config import MAX_BATCH, MAX_EXAMPLES, MAX_STEPS, MAX_TOKENS, Config, method_options, opt
from thinwire.errors import UsageError
from thinwire.methods.base import Reply, RunContext, Workbench, load_into, snapshot
from thinwire.methods.fedavg import FedITClient, FedITServer
from thinwire.models import load_model, vocab_rows
from thinwire.models.logits import LocalLogitsProvider, position_ids
from thinwire.proxy import ProxyModel, check_vocab, save_proxy, small_providers
from thinwire.seeding import derive_seed
from thinwire.wire import Payload


@dataclass
class FedPTOptions:
    """`[method.fedpt]`. `large` is the black box; `model.name` the device model, or the large one (see `pair`)."""

    large: str = opt("", "the large model the server proxy-tunes (queried for next-token logits only); '' "
                     "(default): model.name's built-in pair (model.name tiny or smollm2-135m is then the "
                     "large model and the devices train tiny-small or smollm2-small; model.name tiny-small or "
                     "smollm2-small is the device model and its large pair is proxy-tuned). Set, model.name "
                     "is the device model")
    alpha: float = opt(1.0, "proxy-tuning strength: z_large + alpha (z_tuned - z_anti)", low=0)
    anti: str = opt("pretrained", "anti-expert: the pretrained small model, the round's broadcast model, or a "
                    "small adapter distilled from the large model alone like the expert's (needs distill)",
                    choices=("pretrained", "broadcast", "distilled"))
    distill: bool = opt(True, "distil the proxy-tuned large model into the small adapter each round "
                        "(false: FedIT then proxy-tune, the FedAvg+PT baseline)")
    kd_steps: int = opt(10, "distillation optimizer steps per round", low=0, high=MAX_STEPS)
    kd_lr: float = opt(5e-4, "distillation learning rate (AdamW on the adapter)", low=0)
    kd_batch_size: int = opt(8, "distillation examples per step", low=1, high=MAX_BATCH)
    kd_temperature: float = opt(1.0, "distillation softmax temperature", low=1e-3)
    kd_direction: str = opt("forward", "KL(proxy || student) (forward) or KL(student || proxy) (reverse)",
                            choices=("forward", "reverse"))
    kd_prompts: str = opt("suite", "server-side prompts: the built-in task suite, Alpaca template", choices=("suite",))
    kd_targets: str = opt("generated", "continuations: the proxy's greedy generations, or the suite's references",
                          choices=("generated", "reference"))
    kd_examples: int = opt(32, "distillation prompts per round", low=1, high=MAX_EXAMPLES)
    kd_max_new_tokens: int = opt(16, "length bound of generated distillation targets", low=1,
                                high=MAX_TOKENS)


def pair(config: Config) -> tuple[str, str]:
    """(small device model, large model) of a FedPT run; see the module docstring."""
    from thinwire.models import SMALL_PAIRS, large_of

    name, large = config.model.name, method_options(config, "fedpt", FedPTOptions).large
    if large:
        return name, large
    if name in SMALL_PAIRS:
        return SMALL_PAIRS[name], name
    if large_of(name):
        return name, large_of(name)
    raise UsageError(f"fedpt: model {name!r} has no built-in small pair; set method.fedpt.large to the large "
                     f"model (model.name is then the device model), or use one of {', '.join(SMALL_PAIRS)}")


def use_small_workbench(ctx: RunContext) -> None:
    """Point `ctx` at a workbench over the small device model when `model.name` names the large one,
    keeping the one it replaces in `ctx.set_aside` (whichever side, client or server, comes first)."""
    small, _ = pair(ctx.config)
    if ctx.workbench.config.model.name == small:
        return
    ctx.set_aside[ctx.workbench.config.model.name] = ctx.workbench
    config = dataclasses.replace(ctx.config, model=dataclasses.replace(ctx.config.model, name=small))
    ctx.workbench = Workbench(config)


def kd_loss(teacher_logp: torch.Tensor, student_logits: torch.Tensor, temperature: float, direction: str) -> torch.Tensor:
    """Mean KL over rows between the teacher's log-probs (at T) and softmax(student / T), × T²."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = teacher_logp
    kl = (t.exp() * (t - s)).sum(-1) if direction == "forward" else (s.exp() * (s - t)).sum(-1)
    return kl.mean() * temperature**2


class FedPTServer(FedITServer):
    private_refusal = "its clients' adapters are distilled on the server one by one"

    @classmethod
    def update_space(cls, config: Config) -> None:
        return None

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.small_name, self.large_name = pair(ctx.config)
        use_small_workbench(ctx)

    def setup(self) -> None:
        self.options = opts = method_options(self.config, "fedpt", FedPTOptions)
        if opts.anti == "distilled" and not (opts.distill and opts.kd_steps > 0):
            raise UsageError("method.fedpt.anti = 'distilled' distils the anti-expert alongside the expert: "
                             "set method.fedpt.distill = true and kd_steps > 0, or choose another anti")
        super().setup()
        wb = self.ctx.workbench
        self.lora_model, self.params = wb.trainable(True)
        seed = self.config.federation.seed
        loaded = self.ctx.set_aside.get(self.large_name)
        if loaded is not None:  # the runtime's workbench already holds the large model
            large, large_tokenizer = loaded.model, loaded.tokenizer
        else:
            large, large_tokenizer = load_model(dataclasses.replace(self.config.model, name=self.large_name), seed)
        check_vocab(wb.tokenizer, large_tokenizer)
        for p in large.parameters():
            p.requires_grad_(False)
        self.vocab = vocab_rows(large)
        small_vocab = vocab_rows(self.lora_model)
        if small_vocab < self.vocab:
            raise UsageError(f"small model {self.small_name!r} has {small_vocab} vocabulary rows, fewer than "
                             f"the large model {self.large_name!r} ({self.vocab})")
        self.large = large
        self.large_provider = LocalLogitsProvider(large, self.vocab)
        self.expert = snapshot(self.weights)  # the adapter the proxy uses (aggregated, pre-distillation)
        self.anti_weights: dict[str, torch.Tensor] | None = None if opts.anti == "pretrained" else snapshot(self.weights)
        data = self.config.data
        from thinwire.data.tasks import FAMILIES

        families = [f for f in (data.tasks if data.source == "tasks" and data.tasks else FAMILIES)
                    if f not in data.heldout_tasks]
        self.kd_families = families or list(FAMILIES)

    # -- the proxy ----------------------------------------------------------------------------

    def proxy(self) -> ProxyModel:
        expert, anti = small_providers(self.lora_model, self.params, self.expert, self.anti_weights, self.vocab)
        return ProxyModel(self.large_provider, expert, anti, self.options.alpha, modules=[self.lora_model]).eval()

    def eval_model(self) -> torch.nn.Module:
        return self.proxy()

    # -- rounds -------------------------------------------------------------------------------

    def aggregate(self, rnd: int, replies: list[Reply]) -> dict[str, float]:
        broadcast = snapshot(self.weights)  # what this round's clients downloaded
        metrics = super().aggregate(rnd, replies)
        self.expert = snapshot(self.weights)
        if self.options.anti == "broadcast":
            self.anti_weights = broadcast
        if self.options.distill and self.options.kd_steps > 0:
            metrics.update(self.distill(rnd))
        return metrics

    def kd_prompts(self, rnd: int) -> list[dict]:
        from thinwire.data.tasks import generate_suite

        opts, seed = self.options, derive_seed(self.config.federation.seed, "fedpt-kd", rnd)
        per_family = -(-opts.kd_examples // len(self.kd_families))
        pool = generate_suite(per_family, seed, self.kd_families)
        order = np.random.default_rng(seed).permutation(len(pool))[: opts.kd_examples]
        return [pool[i] for i in order]

    def kd_batches(self, rnd: int, proxy: ProxyModel) -> list[dict[str, torch.Tensor]]:
        """Distillation batches: input_ids, attention_mask and `target` (positions whose next token
        is a response token), for generated or reference continuations."""
        from thinwire.data.template import collate, encode_example, encode_prompts, response_targets

        tok, opts = self.ctx.workbench.tokenizer, self.options
        examples = self.kd_prompts(rnd)
        batches = []
        for start in range(0, len(examples), opts.kd_batch_size):
            chunk = examples[start : start + opts.kd_batch_size]
            if opts.kd_targets == "reference":
                b = collate([encode_example(tok, e, self.config.data.max_length) for e in chunk], tok.pad_token_id)
                batches.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                                "target": response_targets(b["labels"])})
                continue
            enc = encode_prompts(tok, chunk)
            seq = proxy.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=opts.kd_max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).cpu()
            width = enc["input_ids"].shape[1]
            new = seq[:, width:]
            ended = (new == tok.eos_token_id).long()
            # generated tokens up to and including the first eos are real
            real = (ended.cumsum(1) - ended) == 0
            mask = torch.cat([enc["attention_mask"], real.long()], dim=1)
            target = torch.zeros_like(mask, dtype=torch.bool)
            target[:, width - 1 : -1] = real
            batches.append({"input_ids": seq, "attention_mask": mask, "target": target})
        return batches

    def distill(self, rnd: int) -> dict[str, float]:
        opts = self.options
        started = time.perf_counter()
        teacher = self.proxy()
        batches = self.kd_batches(rnd, teacher)
        self.set_teacher(batches, teacher.sequence_logits)
        distilled, metrics = self.kd_train(self.expert, batches, derive_seed(self.config.federation.seed,
                                                                             "fedpt-kd-train", rnd))
        metrics["kd_large_queries"] = float(teacher.queries)
        if opts.anti == "distilled":
            self.set_teacher(batches, self.large_provider.sequence_logits)
            metrics["kd_large_queries"] += float(sum(int(b["attention_mask"].sum()) for b in batches))
            self.anti_weights, anti = self.kd_train(self.anti_weights, batches, derive_seed(
                self.config.federation.seed, "fedpt-kd-anti", rnd))
            metrics.update({f"kd_anti_{k[3:]}": v for k, v in anti.items()})
        load_into(self.params, distilled)
        with torch.no_grad():
            for name, value in distilled.items():
                self.weights[name].copy_(value)
        return {**metrics, "kd_positions": float(sum(int(b["target"].sum()) for b in batches)),
                "kd_s": time.perf_counter() - started}

    def set_teacher(self, batches: list[dict[str, torch.Tensor]], sequence_logits) -> None:
        """Each batch's `teacher`: log-probs at `kd_temperature` on its distillation positions."""
        with torch.no_grad():
            for b in batches:
                z = sequence_logits(b["input_ids"], b["attention_mask"])
                b["teacher"] = torch.log_softmax(z[b["target"].to(z.device)] / self.options.kd_temperature, dim=-1)

    def kd_train(self, start: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]],
                 seed: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """`kd_steps` AdamW steps of the small adapter from `start` toward the batches' teacher:
        (the distilled adapter, its losses and KL before/after)."""
        opts = self.options
        load_into(self.params, start)
        model, params = self.lora_model, list(self.params.values())
        model.eval()
        kl_before = self.kd_divergence(batches)
        optimizer = torch.optim.AdamW(params, lr=opts.kd_lr, weight_decay=0.0)
        model.train()
        losses = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for step in range(opts.kd_steps):
                loss = self.kd_batch_loss(batches[step % len(batches)])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
        model.eval()
        kl_after = self.kd_divergence(batches)
        return snapshot(self.params), {"kd_loss_first": losses[0] if losses else math.nan,
                                       "kd_loss_last": losses[-1] if losses else math.nan,
                                       "kd_kl_before": kl_before, "kd_kl_after": kl_after}

    def kd_batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The distillation loss of the small model, as it stands, on one batch."""
        device = next(iter(self.params.values())).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = self.lora_model(input_ids=ids, attention_mask=mask,
                                 position_ids=position_ids(mask, ids.shape[1]), use_cache=False).logits
        student = logits[..., : self.vocab][batch["target"].to(device)]
        return kd_loss(batch["teacher"].to(device), student, self.options.kd_temperature, self.options.kd_direction)

    @torch.no_grad()
    def kd_divergence(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """The distillation loss over every distillation position (the student in eval mode): does
        the student move toward the proxy-tuned teacher?"""
        total = sum(self.kd_batch_loss(b).item() * int(b["target"].sum()) for b in batches)
        return total / max(1, sum(int(b["target"].sum()) for b in batches))

    # -- validation and checkpoints: FedIT uploads; the proxy's adapters ride along -------------

    def check_update(self, reply: Reply) -> None:
        from thinwire.methods import validate

        validate.check_like(reply.payload.tensors, self.weights)

    def update_norm(self, reply: Reply) -> float:
        from thinwire.methods import robust

        return robust.l2_norm(reply.payload.tensors, self.weights)

    def state_dict(self) -> Payload | None:
        state = super().state_dict()
        if state is None:
            return None
        state.tensors.update({f"expert/{k}": v for k, v in self.expert.items()})
        if self.anti_weights is not None:
            state.tensors.update({f"anti/{k}": v for k, v in self.anti_weights.items()})
        return state

    def load_state_dict(self, state: Payload) -> None:
        own = ("expert/", "anti/")
        super().load_state_dict(Payload(tensors={k: v for k, v in state.tensors.items() if not k.startswith(own)},
                                        scalars=state.scalars))
        device = next(iter(self.weights.values())).device
        self.expert = {k[7:]: v.to(device) for k, v in state.tensors.items() if k.startswith("expert/")}
        anti = {k[5:]: v.to(device) for k, v in state.tensors.items() if k.startswith("anti/")}
        self.anti_weights = None if self.options.anti == "pretrained" else anti or snapshot(self.weights)

    # -- outputs ------------------------------------------------------------------------------

    def final_state(self) -> Payload:
        tensors = {f"expert/{k}": v for k, v in self.expert.items()}
        if self.options.distill:
            tensors.update({f"distilled/{k}": v for k, v in self.weights.items()})
        if self.anti_weights is not None:
            tensors.update({f"anti/{k}": v for k, v in self.anti_weights.items()})
        return Payload(tensors=tensors, scalars={"alpha": self.options.alpha, "large": self.large_name,
                                                 "small": self.small_name,
                                                 "anti": self.options.anti})

    def save_artifacts(self, directory: Path) -> list[str]:
        """`proxy/`: what `thinwire generate RUN_DIR/proxy` decodes from."""
        return [self.save(directory / "proxy").name]

    def save(self, directory: Path) -> Path:
        """The proxy-tuned large model as `proxy.save_proxy` writes it (adapter + JSON)."""
        m = self.config.model
        lora = {"lora_rank": m.lora_rank, "lora_alpha": m.lora_alpha, "lora_dropout": m.lora_dropout,
                "lora_targets": list(m.lora_targets),
                **{f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name.startswith("small_")}}
        return save_proxy(directory, self.expert, self.small_name, self.large_name, self.options.alpha, lora,
                          seed=self.config.federation.seed, anti_adapter=self.anti_weights,
                          extra={"distill": self.options.distill})


class FedPTClient(FedITClient):
    """Devices run plain FedIT local training on the small model; they never see the large one."""

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        use_small_workbench(ctx)  # before the runtime loads the workbench: a device loads the small model only
