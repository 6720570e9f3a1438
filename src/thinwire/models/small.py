"""Small proxy models for FedPT: the first layers of a large model, sharing its tokenizer and vocabulary.

- `tiny-small`: the first layer of the `tiny` model built from the same seed (embeddings, final norm
  and LM head shared by value), with the same byte tokenizer. Deterministic in the seed, no healing:
  the tiny pair is random anyway and only serves tests.
- `smollm2-small`: the first `LAYERS` (11) of SmolLM2-135M-Instruct's 30 decoder layers plus its
  embeddings and final norm, with a factorised LM head of rank `HEAD_RANK` (96), "healed" by a
  short distillation from the full model: forward KL(p_large || p_small) at temperature 1 on every
  next-token position of built-in task-suite examples (Alpaca prompt + reference output + eos).
  The kept decoder layers, the final norm and the head's two factors train (AdamW, cosine decay);
  the embedding matrix stays the large model's, so the two share vocabulary rows exactly. Built on
  first use and cached under `cache_root()/models/smollm2-small` (temp dir + atomic rename, like
  smollm2.py).

Why a factorised head: SmolLM2's 49k x 576 (tied) LM head costs 28.3M multiply-adds per token, 21%
of the whole model, and the small model must share the vocabulary, so with the full head only 4
decoder layers fit in a third of the large model's compute, and a 4-layer model learns none of the
suite's tasks (exact match 0 after 5 FedIT rounds). The final hidden states live near a
low-dimensional subspace: projecting them on their top-96 principal directions before the tied
head changes SmolLM2-135M's next-token distribution by KL 0.088 (top-64: 0.244, top-128: 0.035).
So the head is `up(down(h))` with `down` = those 96 directions (96 x 576) and `up` = the embedding
matrix times them (49152 x 96): 4.8M multiply-adds, which leaves room for 11 layers (0.325 of the
large model's forward FLOPs per token). The cached directory is a plain Hugging Face model (the
truncated layers with the tied head) plus `lowrank_head.safetensors`; `load_small` installs the
factorised head from it.

Healing knobs come from the environment so a loaded machine can build a cheaper model:
`THINWIRE_SMALL_HEAL_STEPS` (default 320, ~2.3 s a step on 2 cores: the teacher's forward and the
student's backward dominate; 400 steps took 943 s, over the 15-minute budget, and reached KL
0.19), `THINWIRE_SMALL_LAYERS` (default 11), `THINWIRE_SMALL_HEAD_RANK` (default 96; 0 keeps the
full tied head, as the first sessions' 4-layer model had: 400 steps healed it to KL 0.42). The
marker file records what was run (layers, head rank, steps, KL before/after, seconds, FLOPs); a
cached model built with other settings is rebuilt.

Compute: per token, a decoder layer of SmolLM2-135M costs ~2 x 3.54M FLOPs and the tied LM head
2 x 28.3M (`forward_flops_per_token` gives the estimate for any model, factorised head included).
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

NAME = "smollm2-small"
TINY_NAME = "tiny-small"
LAYERS = 11
HEAD_RANK = 96
TINY_LAYERS = 1
HEAL_STEPS = 320
HEAL_BATCH = 4
HEAL_LR = 5e-4
HEAL_MAX_LENGTH = 96
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


def truncate(model, layers: int):
    """A copy of a decoder-only HF model keeping its first `layers` decoder layers (weights copied)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(f"cannot truncate {type(model).__name__}: no model.layers")
    total = len(inner.layers)
    if not 1 <= layers <= total:
        raise ValueError(f"cannot keep {layers} of {total} layers")
    kept = inner.layers
    inner.layers = torch.nn.ModuleList()  # do not deep-copy the layers we drop
    try:
        small = copy.deepcopy(model)
    finally:
        inner.layers = kept
    small.model.layers = torch.nn.ModuleList(copy.deepcopy(kept[i]) for i in range(layers))
    small.config.num_hidden_layers = layers
    if isinstance(getattr(small.config, "layer_types", None), list):
        small.config.layer_types = small.config.layer_types[:layers]
    if getattr(small.config, "tie_word_embeddings", False):
        small.tie_weights()
    return small


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


def recipe(layers: int | None = None, steps: int | None = None, head_rank: int | None = None) -> dict[str, int]:
    """What `smollm2-small` is built with: arguments, else the environment, else the defaults."""
    return {"layers": _env_int("THINWIRE_SMALL_LAYERS", LAYERS) if layers is None else layers,
            "heal_steps": _env_int("THINWIRE_SMALL_HEAL_STEPS", HEAL_STEPS) if steps is None else steps,
            "head_rank": _env_int("THINWIRE_SMALL_HEAD_RANK", HEAD_RANK) if head_rank is None else head_rank}


def is_ready(root: Path | None = None, layers: int | None = None, steps: int | None = None,
             head_rank: int | None = None) -> bool:
    """Built, complete, and built with this `recipe`."""
    info = _marker(prepared_dir(root))
    want = recipe(layers, steps, head_rank)
    return info is not None and all(info.get(k, 0) == v for k, v in want.items())


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
    return {"name": NAME, "ready": info is not None, "path": str(target),
            "layers": info["layers"] if info else recipe()["layers"],
            "head_rank": info["head_rank"] if info else recipe()["head_rank"],
            "parameters": info["parameters"] if info else None,
            "size_bytes": sum(f.stat().st_size for f in target.iterdir() if f.is_file()) if info else None,
            "compute_ratio": ratio}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        from thinwire.errors import UsageError

        raise UsageError(f"{name} = {value!r} is not an integer") from None


def heal_batches(tokenizer, batch: int, max_length: int, seed: int):
    """Endless right-padded batches of suite examples (prompt + output), in a seeded order."""
    import numpy as np

    from thinwire.data.tasks import generate_suite
    from thinwire.data.template import collate, encode_example

    examples = generate_suite(8, seed)
    encoded = [encode_example(tokenizer, e, max_length) for e in examples]
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(encoded))
        for start in range(0, len(order) - batch + 1, batch):
            yield collate([encoded[i] for i in order[start : start + batch]], tokenizer.pad_token_id)


def kl_on_mask(teacher_logits, student_logits, mask, temperature: float = 1.0, direction: str = "forward"):
    """Mean over masked positions of KL(teacher || student) ("forward") or KL(student || teacher)
    ("reverse") between softmax(logits / T), times T^2 (Hinton's scaling)."""
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if direction == "forward":
        kl = (t.exp() * (t - s)).sum(-1)
    else:
        kl = (s.exp() * (s - t)).sum(-1)
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1) * temperature**2


def heal(small, large, tokenizer, steps: int, batch: int = HEAL_BATCH, lr: float = HEAL_LR,
         max_length: int = HEAL_MAX_LENGTH, seed: int = HEAL_SEED, on_step=None) -> dict[str, float]:
    """Distil `large` into `small` (in place) on suite examples; returns KL before/after."""
    embed = small.get_input_embeddings().weight
    params = [p for p in small.parameters() if p is not embed]
    for p in small.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / 5) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    batches = heal_batches(tokenizer, batch, max_length, seed)
    probe = next(heal_batches(tokenizer, 8, max_length, seed + 1))

    def probe_kl() -> float:
        with torch.no_grad():
            kw = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
            return kl_on_mask(large(**kw).logits, small(**kw).logits, probe["attention_mask"]).item()

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
            loss = kl_on_mask(teacher, small(**kw).logits, b["attention_mask"])
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
    return {"kl_before": before, "kl_after": probe_kl(), "train_kl_last": losses[-1] if losses else float("nan")}


def final_hidden_states(model, tokenizer, batches: int = 8, seed: int = HEAL_SEED + 2) -> torch.Tensor:
    """The model's final (normed) hidden states at every real token of a few suite batches."""
    states = []
    with torch.no_grad():
        for _, b in zip(range(batches), heal_batches(tokenizer, 8, HEAL_MAX_LENGTH, seed)):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            states.append(out.hidden_states[-1][b["attention_mask"].bool()])
    return torch.cat(states)


def prepare(root: Path | None = None, show_progress: bool = True, steps: int | None = None,
            layers: int | None = None, head_rank: int | None = None) -> Path:
    """Directory of `smollm2-small`, building (truncate, factorise the head, heal) it on first use."""
    target = prepared_dir(root)
    want = recipe(layers, steps, head_rank)
    layers, steps, head_rank = want["layers"], want["heal_steps"], want["head_rank"]
    if is_ready(root, layers, steps, head_rank):
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
    small = truncate(large, layers)
    head = factorised_head(large, final_hidden_states(large, tokenizer), head_rank) if head_rank else None
    if head is not None:
        install_head(small, head)

    progress = Progress(TextColumn(f"{NAME}: healing {layers} layers"), BarColumn(), TextColumn("KL {task.fields[kl]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
    with progress if show_progress else nullcontext():
        task = progress.add_task("heal", total=steps, kl="?")

        def on_step(loss: float) -> None:
            progress.update(task, advance=1, kl=f"{loss:.3f}")

        stats = heal(small, large, tokenizer, steps, on_step=on_step if show_progress else None)
    heal_s = time.perf_counter() - started

    flops = forward_flops_per_token(small)
    with building_dir(target, lambda: is_ready(root, layers, steps, head_rank)) as tmp:
        if head is not None:  # saved as a plain HF model with the tied head, the factors beside it
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
            "name": NAME, "source": str(source), "layers": layers, "head_rank": head_rank,
            "source_layers": large.config.num_hidden_layers,
            "heal_steps": steps, "heal_batch": HEAL_BATCH, "heal_lr": HEAL_LR, "heal_seed": HEAL_SEED,
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
                      f"KL {stats['kl_before']:.3f} -> {stats['kl_after']:.3f}) in {heal_s:.0f} s at {target}")
    return target


def load_small(name: str, seed: int):
    """(model, tokenizer) for `tiny-small` or `smollm2-small`."""
    if name == TINY_NAME:
        return build_tiny_small(seed)
    if name == NAME:
        from thinwire.models import _from_pretrained

        directory = prepare()
        model, tokenizer = _from_pretrained(str(directory), local_only=True)
        if (directory / HEAD_FILE).is_file():
            factors = load_file(str(directory / HEAD_FILE))
            head = FactorisedHead(factors["down"].shape[1], factors["down"].shape[0], factors["up"].shape[0])
            head.load_state_dict({"down.weight": factors["down"], "up.weight": factors["up"]})
            install_head(model, head)
        return model, tokenizer
    raise ValueError(f"unknown small model {name!r}")
