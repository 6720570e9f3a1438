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

The recipe is part of the run's config (`[model] small_*`, recorded in config.toml), so a loaded
machine can build a cheaper model and other recipes can be measured (`RECIPE`;
`benchmarks/small_model.py`): `small_layers` (30), `small_mlp_width` (256; 0 keeps the MLPs
whole), `small_keep_last` (0: how many of the layers are the large model's last ones),
`small_heal_steps` (180, ~3.7 s a step on 2 cores: the teacher's forward and the student's
backward dominate), `small_head_rank` (96; 0 keeps the full tied head), `small_heal_per_family`
(8), `small_heal_focus` (`all`, or `response`: the KL on the response positions plus a quarter of
the prompt's), `small_heal_data` (`disjoint`, or `all`: see models/healing.py). The earlier
default is `small_layers = 11, small_mlp_width = 0, small_heal_steps = 320`. The marker file
records what was run (recipe, KL before/after, seconds, FLOPs); a cached model built with
another recipe is rebuilt.

How it is cut (models/surgery.py: why width and not depth, why a factorised head) and healed
(models/healing.py: on which text) is documented where it is done.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from thinwire.config import ModelConfig
from thinwire.models import healing
from thinwire.models.healing import HEAL_BATCH, HEAL_DATA, HEAL_FOCUS, HEAL_LR, HEAL_PER_FAMILY, HEAL_SEED
from thinwire.models.surgery import (
    FactorisedHead,
    factorised_head,
    forward_flops_per_token,
    install_head,
    mlp_importance,
    prune_mlp,
    truncate,
)

NAME = "smollm2-small"
TINY_NAME = "tiny-small"
LAYERS = ModelConfig.small_layers  # the recipe's defaults are the config's (`[model] small_*`)
KEEP_LAST = ModelConfig.small_keep_last
MLP_WIDTH = ModelConfig.small_mlp_width
HEAD_RANK = ModelConfig.small_head_rank
TINY_LAYERS = 1
HEAL_STEPS = ModelConfig.small_heal_steps
MARKER = "thinwire-small.json"
HEAD_FILE = "lowrank_head.safetensors"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", MARKER)


def build_tiny_small(seed: int):
    """`tiny-small`: layer 1 of the `tiny` model built from `seed`, and the same byte tokenizer."""
    from thinwire.models.tiny import build_tiny

    large, tokenizer = build_tiny(seed)
    return truncate(large, TINY_LAYERS), tokenizer


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


def cut_down(large, tokenizer, layers: int, keep_last: int = 0, mlp_width: int = 0,
             head: FactorisedHead | None = None, data: str = HEAL_DATA):
    """The unhealed small model: `large` truncated to `layers` (`keep_last` of them its last), each
    MLP pruned to `mlp_width` neurons (0: whole; importance read on `data`'s families), with a copy
    of `head` (None: the tied head)."""
    small = truncate(large, layers, keep_last)
    if mlp_width:
        prune_mlp(small, mlp_width, mlp_importance(small, healing.calibration_batches(tokenizer, data=data)))
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
    head = factorised_head(large, healing.final_hidden_states(large, tokenizer, data), head_rank) if head_rank else None
    small = cut_down(large, tokenizer, layers, keep_last, want["mlp_width"], head, data)

    progress = Progress(TextColumn(f"{NAME}: healing {layers} layers"), BarColumn(), TextColumn("loss {task.fields[kl]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
    with progress if show_progress else nullcontext():
        task = progress.add_task("heal", total=steps, kl="?")

        def on_step(loss: float) -> None:
            progress.update(task, advance=1, kl=f"{loss:.3f}")

        stats = healing.heal(small, large, tokenizer, steps, per_family=want["heal_per_family"], focus=want["heal_focus"],
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
