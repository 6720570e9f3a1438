"""Small proxy models for FedPT: cut-down copies of a large model, sharing its tokenizer and vocabulary.

- `tiny-small`: the first layer of the `tiny` model built from the same seed (embeddings, final norm
  and LM head shared by value), with the same byte tokenizer. Deterministic in the seed, no healing:
  the tiny pair is random anyway and only serves tests.
- `smollm2-small`: all 30 decoder layers of SmolLM2-135M-Instruct with every MLP pruned to its
  `MLP_WIDTH` (256 of 1536) most important neurons (mean activation magnitude on suite examples
  times the norm of the neuron's `down_proj` column), the attention untouched, its embeddings
  and final norm, and a factorised LM head of rank `HEAD_RANK` (96); "healed" by a short
  distillation from the full model: forward KL(p_large || p_small) at temperature 1 on every
  next-token position of built-in task-suite examples (Alpaca prompt + reference output + eos, 8
  of each of the 30 families outside the headline's evaluation, `HEAL_FAMILIES`), `HEAL_STEPS`
  (180) steps. The decoder layers, the final norm and
  the head's two factors train (AdamW, cosine decay); the embedding matrix stays the large
  model's, so the two share vocabulary rows exactly. 0.332 of the large model's forward FLOPs
  per token. Built on first use (675 s of healing on 2 cores) and cached under
  `cache_root()/models/smollm2-small` (temp dir + atomic rename, like smollm2.py).

Healing data (`[model] small_heal_data`, recorded as `heal_data`): `disjoint` (the default) uses
only the built-in families that the headline work (benchmarks/compare_smollm2.toml) neither trains
nor evaluates on: its eight `data.tasks` and its four held-out families (`HEADLINE_FAMILIES`) are
left out of the healing text, and of the calibration batches that choose the head's directions
and the MLP neurons, so the small model has not seen those families' answers before FedPT tunes
it. (The KL probe reported in the marker is a measurement only and still spans all families.)
`all` is the earlier build, healed on all 42 families with their reference outputs, the
evaluation families included; a cached model healed that way is rebuilt on first use. Only the
teacher's distribution over these texts is used, never a label: the large model is the teacher.

Why width and not depth (docs/benchmarks/history.md, seventh session): at the same FLOPs, the earlier default
kept the first 11 layers whole. After 60 healing steps from the same start its KL to the large
model on held-out response positions was 2.35 (first 10 + last layer: 2.07; 15 layers with
1024-neuron MLPs: 2.04; 20 with 640: 1.91), against 1.70 for all 30 layers with 256 neurons. The
suite's tasks (copying, reformatting) live in attention that truncation throws away: trained
centrally, the 11-layer expert reaches exact match 0.29 alone and proxy-tunes the large model to
59% of FedIT-on-large's exact-match gain; the pruned one reaches 0.50 alone and 96%.

Why a factorised head: SmolLM2's 49k x 576 (tied) LM head costs 28.3M multiply-adds per token, 21%
of the whole model, and the small model must share the vocabulary, so the full head alone would
take most of a third of the large model's compute. The final hidden states live near a
low-dimensional subspace: projecting them on their top-96 principal directions before the tied
head changes SmolLM2-135M's next-token distribution by KL 0.088 (top-64: 0.244, top-128: 0.035).
So the head is `up(down(h))` with `down` = those 96 directions (96 x 576) and `up` = the embedding
matrix times them (49152 x 96): 4.8M multiply-adds. (Rank 96 does limit what LoRA learns on
copying families through the large model's body, `benchmarks/head_rank.py`; but trading MLP width
for rank, 96 neurons and rank 256, made FedIT on the small model worse: docs/benchmarks/history.md, eighth
session.) The cached directory is a plain Hugging Face
model (the pruned layers with the tied head) plus `lowrank_head.safetensors`; `load_small`
installs the factorised head from it.

The recipe is part of the run's config (`[model] small_*`, recorded in config.toml), so a loaded
machine can build a cheaper model and other recipes can be measured (`RECIPE`;
`benchmarks/small_model.py`): `small_layers` (30), `small_mlp_width` (256; 0 keeps the MLPs
whole), `small_keep_last` (0: how many of the layers are the large model's last ones),
`small_heal_steps` (180, ~3.7 s a step on 2 cores: the teacher's forward and the student's
backward dominate), `small_head_rank` (96; 0 keeps the full tied head), `small_heal_per_family`
(8), `small_heal_focus` (`all`, or `response`: the KL on the response positions plus a quarter of
the prompt's), `small_heal_data` (`disjoint`, or `all`: see Healing data above). The earlier
default is `small_layers = 11, small_mlp_width = 0, small_heal_steps = 320`. The marker file
records what was run (recipe, KL before/after, seconds, FLOPs); a cached model built with
another recipe is rebuilt.

Compute: per token, a decoder layer of SmolLM2-135M costs ~2 x 3.54M FLOPs (attention 0.89M
multiply-adds, MLP 2.65M) and the tied LM head 2 x 28.3M (`forward_flops_per_token` gives the
estimate for any model, factorised head included).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from thinwire.config import ModelConfig

NAME = "smollm2-small"
TINY_NAME = "tiny-small"
LAYERS = ModelConfig.small_layers  # the recipe's defaults are the config's (`[model] small_*`)
KEEP_LAST = ModelConfig.small_keep_last
MLP_WIDTH = ModelConfig.small_mlp_width
HEAD_RANK = ModelConfig.small_head_rank
TINY_LAYERS = 1
HEAL_STEPS = ModelConfig.small_heal_steps
HEAL_BATCH = 4
HEAL_LR = 5e-4
HEAL_MAX_LENGTH = 96
HEAL_PER_FAMILY = ModelConfig.small_heal_per_family
HEAL_FOCUS = ModelConfig.small_heal_focus
HEAL_FOCI = ("all", "response")
HEAL_DATA = ModelConfig.small_heal_data
HEAL_DATAS = ("disjoint", "all")
# the headline work's evaluation families (benchmarks/compare_smollm2.toml: data.tasks, then the
# held-out ones): `disjoint` healing leaves them out
HEADLINE_FAMILIES = ("add", "uppercase", "last-item", "date-reformat", "capital-of", "km-to-m", "max-number",
                     "extract-year", "subtract", "min-number", "swap-case", "kg-to-g")
HEAL_PROMPT_WEIGHT = 0.25
HEAL_SEED = 1234
MARKER = "thinwire-small.json"
HEAD_FILE = "lowrank_head.safetensors"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", MARKER)


class FactorisedHead(torch.nn.Module):
    """An LM head of rank r: logits = up(down(h)); `out_features` like the nn.Linear it replaces."""

    def __init__(self, hidden: int, rank: int, vocab: int) -> None:
        super().__init__()
        self.down = torch.nn.Linear(hidden, rank, bias=False)
        self.up = torch.nn.Linear(rank, vocab, bias=False)
        self.out_features = vocab

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(hidden_states))


def factorised_head(model, hidden_states: torch.Tensor, rank: int) -> FactorisedHead:
    """The rank-`rank` head closest to `model`'s on these final hidden states: the tied head
    applied after projecting on their top principal directions (uncentred: logits are linear in h)."""
    weight = model.get_output_embeddings().weight.detach().float()
    h = hidden_states.reshape(-1, hidden_states.shape[-1]).double()
    _, vectors = torch.linalg.eigh(h.T @ h)
    top = vectors[:, -rank:].flip(-1).float()  # hidden x rank, strongest direction first
    head = FactorisedHead(weight.shape[1], rank, weight.shape[0])
    with torch.no_grad():
        head.down.weight.copy_(top.T)
        head.up.weight.copy_(weight @ top)
    return head


def install_head(model, head: FactorisedHead) -> None:
    """Replace the (tied) LM head; the model no longer ties input and output embeddings."""
    model.lm_head = head
    model.config.tie_word_embeddings = False


def truncate(model, layers: int, keep_last: int = 0):
    """A copy of a decoder-only HF model keeping `layers` decoder layers (weights copied): the first
    `layers - keep_last` and the last `keep_last`, renumbered so KV caches index them 0..layers-1."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(f"cannot truncate {type(model).__name__}: no model.layers")
    total = len(inner.layers)
    if not 1 <= layers <= total:
        raise ValueError(f"cannot keep {layers} of {total} layers")
    if not 0 <= keep_last < layers:
        raise ValueError(f"cannot keep the last {keep_last} of {layers} layers: keep at least the first one")
    chosen = list(range(layers - keep_last)) + list(range(total - keep_last, total))
    kept = inner.layers
    inner.layers = torch.nn.ModuleList()  # do not deep-copy the layers we drop
    try:
        small = copy.deepcopy(model)
    finally:
        inner.layers = kept
    small.model.layers = torch.nn.ModuleList(copy.deepcopy(kept[i]) for i in chosen)
    for position, layer in enumerate(small.model.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = position
    small.config.num_hidden_layers = layers
    if isinstance(getattr(small.config, "layer_types", None), list):
        small.config.layer_types = [small.config.layer_types[i] for i in chosen]
    if getattr(small.config, "tie_word_embeddings", False):
        small.tie_weights()
    return small


def mlp_importance(model, batches: list[dict]) -> list[torch.Tensor]:
    """Per decoder layer, each MLP neuron's share of the layer's output on these batches: the mean
    magnitude of its activation (the input of `down_proj`) over real tokens, times the norm of its
    `down_proj` column (what that activation is multiplied by on the way out)."""
    layers = model.model.layers
    totals = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    current: dict[str, torch.Tensor] = {}

    def recorder(index: int):
        def hook(module, inputs):
            mask = current["mask"].unsqueeze(-1).to(inputs[0].dtype)
            totals[index] += (inputs[0].abs() * mask).sum((0, 1))
        return hook

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(recorder(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b["attention_mask"]
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    return [t * layer.mlp.down_proj.weight.detach().norm(dim=0) for t, layer in zip(totals, layers)]


def prune_mlp(model, width: int, importance: list[torch.Tensor]) -> None:
    """Keep each decoder layer's `width` most important MLP neurons (in place; a uniform
    `intermediate_size`, so the result is a plain HF model of that config)."""
    for layer, scores in zip(model.model.layers, importance):
        neurons = layer.mlp.down_proj.in_features
        if scores.numel() != neurons:
            raise ValueError(f"{scores.numel()} importance scores for {neurons} MLP neurons")
        if not 1 <= width <= neurons:
            raise ValueError(f"cannot keep {width} of {neurons} MLP neurons")
        keep = torch.topk(scores, width).indices.sort().values
        mlp = layer.mlp
        for name, rows in (("gate_proj", True), ("up_proj", True), ("down_proj", False)):
            old = getattr(mlp, name)
            weight = old.weight.detach()[keep] if rows else old.weight.detach()[:, keep]
            new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
            new.weight = torch.nn.Parameter(weight.clone())
            setattr(mlp, name, new)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    model.config.intermediate_size = width


def build_tiny_small(seed: int):
    """`tiny-small`: layer 1 of the `tiny` model built from `seed`, and the same byte tokenizer."""
    from thinwire.models.tiny import build_tiny

    large, tokenizer = build_tiny(seed)
    return truncate(large, TINY_LAYERS), tokenizer


def forward_flops_per_token(model) -> int:
    """Estimated forward FLOPs per token: 2 x (weights used per token); embedding lookups are free,
    a tied LM head counts once as a matmul. Ignores attention's context-length term."""
    embed = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)
    total = 0
    for name, p in model.named_parameters():
        if p is embed and p is not head:
            continue
        total += p.numel()  # a tied embedding appears once and counts as the LM head
    return 2 * total


# ------------------------------------------------------------------------------------------------
# smollm2-small: build, heal, cache
# ------------------------------------------------------------------------------------------------


def prepared_dir(root: Path | None = None) -> Path:
    from thinwire.models.smollm2 import cache_root

    return Path(root if root is not None else cache_root()).expanduser() / "models" / NAME


# recipe key -> (default, value of a marker that lacks the key: what the earlier builds did)
RECIPE = {
    "layers": (LAYERS, 0),
    "keep_last": (KEEP_LAST, 0),
    "mlp_width": (MLP_WIDTH, 0),
    "heal_steps": (HEAL_STEPS, 0),
    "head_rank": (HEAD_RANK, 0),
    "heal_per_family": (HEAL_PER_FAMILY, 8),
    "heal_focus": (HEAL_FOCUS, "all"),
    "heal_data": (HEAL_DATA, "all"),
}


def recipe(**overrides: Any) -> dict[str, Any]:
    """What `smollm2-small` is built with: `overrides` (None: the default) over the defaults."""
    return {key: default if overrides.get(key) is None else overrides[key] for key, (default, _) in RECIPE.items()}


def recipe_of(model: ModelConfig) -> dict[str, Any]:
    """The recipe a config's `[model] small_*` keys name."""
    return {key: getattr(model, f"small_{key}") for key in RECIPE}


def is_ready(root: Path | None = None, **overrides: Any) -> bool:
    """Built, complete, and built with this `recipe`."""
    info = _marker(prepared_dir(root))
    return info is not None and all(info.get(k, RECIPE[k][1]) == v for k, v in recipe(**overrides).items())


def _marker(target: Path) -> dict[str, Any] | None:
    if not all((target / name).is_file() for name in REQUIRED_FILES):
        return None
    try:
        return json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None


def describe(root: Path | None = None) -> dict[str, Any]:
    """Facts for `thinwire models`; cheap (never loads or builds the model)."""
    target = prepared_dir(root)
    info = _marker(target) if is_ready(root) else None
    ratio = info["flops_per_token"] / info["large_flops_per_token"] if info else None
    shape = {k: info.get(k, RECIPE[k][1]) for k in RECIPE} if info else recipe()
    return {"name": NAME, "ready": info is not None, "path": str(target),
            **{k: shape[k] for k in ("layers", "keep_last", "mlp_width", "heal_focus", "head_rank")},
            "parameters": info["parameters"] if info else None,
            "size_bytes": sum(f.stat().st_size for f in target.iterdir() if f.is_file()) if info else None,
            "compute_ratio": ratio}


def heal_families(data: str = HEAL_DATA) -> list[str]:
    """The built-in families a `data` recipe heals on: all of them, or those outside the headline's
    evaluation (`disjoint`)."""
    from thinwire.data.tasks import FAMILIES

    if data not in HEAL_DATAS:
        raise ValueError(f"unknown healing data {data!r}; choose one of {', '.join(HEAL_DATAS)}")
    return [f for f in FAMILIES if data == "all" or f not in HEADLINE_FAMILIES]


def heal_batches(tokenizer, batch: int, max_length: int, seed: int, per_family: int = 8,
                 families: list[str] | None = None):
    """Endless right-padded batches of suite examples (prompt + output) of `families` (default:
    all), in a seeded order."""
    import numpy as np

    from thinwire.data.tasks import generate_suite
    from thinwire.data.template import collate, encode_example

    examples = generate_suite(per_family, seed, families)
    encoded = [encode_example(tokenizer, e, max_length) for e in examples]
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(encoded))
        for start in range(0, len(order) - batch + 1, batch):
            yield collate([encoded[i] for i in order[start : start + batch]], tokenizer.pad_token_id)


def kl_per_position(teacher_logits, student_logits, temperature: float = 1.0, direction: str = "forward"):
    """KL(teacher || student) ("forward") or KL(student || teacher) ("reverse") between
    softmax(logits / T) at every position, times T^2 (Hinton's scaling)."""
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1) if direction == "forward" else (s.exp() * (s - t)).sum(-1)
    return kl * temperature**2


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def heal_loss(teacher_logits, student_logits, batch, focus: str = HEAL_FOCUS,
              prompt_weight: float = HEAL_PROMPT_WEIGHT):
    """KL(p_large || p_small): the mean over all real positions (`focus = "all"`), or on the
    response positions plus `prompt_weight` times it on the prompt's (`"response"`).

    Why "response" exists: proxy-tuning and evaluation score only response positions, and there the
    all-positions model is far worse (KL 1.66, against 0.10 on the prompt's template tokens, which
    outnumber them and dominate that loss)."""
    from thinwire.data.template import response_targets

    kl = kl_per_position(teacher_logits, student_logits)
    if focus == "all":
        return _masked_mean(kl, batch["attention_mask"])
    response = response_targets(batch["labels"])
    prompt = batch["attention_mask"].bool() & ~response
    return _masked_mean(kl, response) + prompt_weight * _masked_mean(kl, prompt)


def probe_batches(tokenizer, seed: int, max_length: int = HEAL_MAX_LENGTH, batches: int = 4) -> list[dict]:
    """A fixed set of held-out suite batches (8 examples per family to draw from, batches of 8)."""
    return [b for _, b in zip(range(batches), heal_batches(tokenizer, 8, max_length, seed, per_family=8))]


def closeness(small, large, batches: list[dict]) -> dict[str, float]:
    """How near `small` is to `large` on these batches, averaged over them: KL(p_large || p_small)
    on all, response and prompt positions, and both models' cross-entropy on the response tokens."""
    from thinwire.data.template import response_targets

    keys = ("kl_all", "kl_response", "kl_prompt", "ce_small", "ce_large")
    totals = dict.fromkeys(keys, 0.0)
    with torch.no_grad():
        for b in batches:
            kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            z_large, z_small = large(**kw).logits, small(**kw).logits
            kl = kl_per_position(z_large, z_small)
            response = response_targets(b["labels"])
            totals["kl_all"] += _masked_mean(kl, b["attention_mask"]).item()
            totals["kl_response"] += _masked_mean(kl, response).item()
            totals["kl_prompt"] += _masked_mean(kl, b["attention_mask"].bool() & ~response).item()
            labels = b["input_ids"][:, 1:][response[:, :-1]]
            for name, z in (("ce_small", z_small), ("ce_large", z_large)):
                totals[name] += torch.nn.functional.cross_entropy(z[:, :-1][response[:, :-1]].float(), labels).item()
    return {k: v / max(1, len(batches)) for k, v in totals.items()}


def heal(small, large, tokenizer, steps: int, batch: int = HEAL_BATCH, lr: float = HEAL_LR,
         max_length: int = HEAL_MAX_LENGTH, seed: int = HEAL_SEED, per_family: int = HEAL_PER_FAMILY,
         focus: str = HEAL_FOCUS, on_step=None, data: str = HEAL_DATA) -> dict[str, float]:
    """Distil `large` into `small` (in place) on suite examples of `heal_families(data)`; returns the
    KL before and after, on all positions and on the response positions, of held-out suite examples
    (all families)."""
    embed = small.get_input_embeddings().weight
    params = [p for p in small.parameters() if p is not embed]
    for p in small.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / 5) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    batches = heal_batches(tokenizer, batch, max_length, seed, per_family, heal_families(data))
    probe = probe_batches(tokenizer, seed + 1, max_length)

    def probe_kl() -> tuple[float, float]:
        c = closeness(small, large, probe)
        return c["kl_all"], c["kl_response"]

    large.eval()
    before = probe_kl()
    small.train()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            b = next(batches)
            kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            with torch.no_grad():
                teacher = large(**kw).logits
            loss = heal_loss(teacher, small(**kw).logits, b, focus)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(loss.item())
    small.eval()
    for p in small.parameters():
        p.requires_grad_(True)
    after = probe_kl()
    return {"kl_before": before[0], "kl_after": after[0], "kl_response_before": before[1],
            "kl_response_after": after[1], "train_loss_last": losses[-1] if losses else float("nan")}


def calibration_batches(tokenizer, batches: int = 8, seed: int = HEAL_SEED + 2, data: str = HEAL_DATA) -> list[dict]:
    """A few suite batches of 8 (of `heal_families(data)`) that the head's directions and the MLP
    neurons' importance are read on."""
    stream = heal_batches(tokenizer, 8, HEAL_MAX_LENGTH, seed, families=heal_families(data))
    return [b for _, b in zip(range(batches), stream)]


def final_hidden_states(model, tokenizer, data: str = HEAL_DATA) -> torch.Tensor:
    """The model's final (normed) hidden states at every real token of the calibration batches."""
    states = []
    with torch.no_grad():
        for b in calibration_batches(tokenizer, data=data):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            states.append(out.hidden_states[-1][b["attention_mask"].bool()])
    return torch.cat(states)


def cut_down(large, tokenizer, layers: int, keep_last: int = 0, mlp_width: int = 0,
             head: FactorisedHead | None = None, data: str = HEAL_DATA):
    """The unhealed small model: `large` truncated to `layers` (`keep_last` of them its last), each
    MLP pruned to `mlp_width` neurons (0: whole; importance read on `data`'s families), with a copy
    of `head` (None: the tied head)."""
    small = truncate(large, layers, keep_last)
    if mlp_width:
        prune_mlp(small, mlp_width, mlp_importance(small, calibration_batches(tokenizer, data=data)))
    if head is not None:
        install_head(small, copy.deepcopy(head))
    return small


def prepare(root: Path | None = None, show_progress: bool = True, **overrides: Any) -> Path:
    """Directory of `smollm2-small`, building (truncate, factorise the head, heal) it on first use;
    `overrides` are `recipe` keys."""
    target = prepared_dir(root)
    want = recipe(**overrides)
    layers, steps, head_rank, keep_last = want["layers"], want["heal_steps"], want["head_rank"], want["keep_last"]
    if is_ready(root, **want):
        return target
    from contextlib import nullcontext

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinwire.models.smollm2 import building_dir
    from thinwire.models.smollm2 import prepare as prepare_large

    console = Console(stderr=True)
    source = prepare_large(root, show_progress=show_progress)
    started = time.perf_counter()
    large = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    large.eval()
    for p in large.parameters():
        p.requires_grad_(False)
    data = want["heal_data"]
    head = factorised_head(large, final_hidden_states(large, tokenizer, data), head_rank) if head_rank else None
    small = cut_down(large, tokenizer, layers, keep_last, want["mlp_width"], head, data)

    progress = Progress(TextColumn(f"{NAME}: healing {layers} layers"), BarColumn(), TextColumn("loss {task.fields[kl]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
    with progress if show_progress else nullcontext():
        task = progress.add_task("heal", total=steps, kl="?")

        def on_step(loss: float) -> None:
            progress.update(task, advance=1, kl=f"{loss:.3f}")

        stats = heal(small, large, tokenizer, steps, per_family=want["heal_per_family"], focus=want["heal_focus"],
                     on_step=on_step if show_progress else None, data=data)
    heal_s = time.perf_counter() - started

    flops = forward_flops_per_token(small)
    with building_dir(target, lambda: is_ready(root, **want)) as tmp:
        if head is not None:  # saved as a plain HF model with the tied head, the factors beside it
            head = small.lm_head  # the healed copy that cut_down installed
            tied = torch.nn.Linear(head.down.in_features, head.out_features, bias=False)
            tied.weight = small.get_input_embeddings().weight
            small.lm_head, small.config.tie_word_embeddings = tied, True
            save_file({"down": head.down.weight.contiguous(), "up": head.up.weight.contiguous()}, str(tmp / HEAD_FILE))
        small.save_pretrained(str(tmp), safe_serialization=True)
        for name in os.listdir(source):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json", "generation_config.json",
                                                        "vocab.json", "merges.txt"):
                if not (tmp / name).exists():
                    shutil.copy2(source / name, tmp / name)
        info: dict[str, Any] = {
            "name": NAME, "source": str(source), **want,
            "source_layers": large.config.num_hidden_layers,
            "heal_batch": HEAL_BATCH, "heal_lr": HEAL_LR, "heal_seed": HEAL_SEED,
            "heal_s": round(heal_s, 1), **{k: round(v, 4) for k, v in stats.items()},
            "parameters": sum(p.numel() for p in small.parameters()),
            "flops_per_token": flops,
            "large_flops_per_token": forward_flops_per_token(large),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")  # last: marks the dir complete
    if show_progress:
        console.print(f"[green]prepared {NAME}[/green] ({layers} layers, head rank {head_rank or 'full'}, "
                      f"{steps} healing steps, "
                      f"KL on responses {stats['kl_response_before']:.3f} -> {stats['kl_response_after']:.3f}) "
                      f"in {heal_s:.0f} s at {target}")
    return target


def load_prepared(directory: Path):
    """(model, tokenizer) of a prepared `smollm2-small` directory, its factorised head installed."""
    from thinwire.models.pretrained import from_pretrained

    model, tokenizer = from_pretrained(str(directory), local_only=True)
    if (directory / HEAD_FILE).is_file():
        factors = load_file(str(directory / HEAD_FILE))
        head = FactorisedHead(factors["down"].shape[1], factors["down"].shape[0], factors["up"].shape[0])
        head.load_state_dict({"down.weight": factors["down"], "up.weight": factors["up"]})
        install_head(model, head)
    return model, tokenizer


def load_small(name: str, seed: int, small_recipe: dict[str, Any] | None = None):
    """(model, tokenizer) for `tiny-small` or `smollm2-small` (built with `small_recipe`)."""
    if name == TINY_NAME:
        return build_tiny_small(seed)
    if name == NAME:
        return load_prepared(prepare(**(small_recipe or {})))
    raise ValueError(f"unknown small model {name!r}")
