"""How close is the small model to the large one where it matters? KL and cross-entropy of
`smollm2-small` against SmolLM2-135M on held-out suite examples, on the response positions (the
only ones proxy-tuning and evaluation score) and on the prompt's.

Without `--heal-steps` it reads the cached model of the default recipe (`[model] small_*`) under
`THINWIRE_CACHE`. With it, it builds the small model of each `--recipes` × `--focus`
in memory and heals it for that many steps first: a quick comparison of recipes at the same FLOPs.
A recipe is layers:keep_last:mlp_width[:head_rank] (mlp_width 0 keeps the MLPs whole; head_rank
defaults to the built-in's, 0 keeps the full tied head).

    python benchmarks/small_model.py
    python benchmarks/small_model.py --heal-steps 60 --recipes 11:0:0,11:1:0,15:1:1024,20:1:640,30:0:256
    python benchmarks/small_model.py --heal-steps 60 --recipes 30:0:256:96,30:0:160:192
    python benchmarks/small_model.py --heal-steps 60 --recipes 11:0:0,11:1:0 --focus all,response
    python benchmarks/small_model.py --heal-steps 60 --recipes 30:0:256:96,24:4:256:256 --lora-steps 30

`--lora-steps N` adds what matters to a device: the held-out response loss on `--lora-tasks` (the
families the small model's clients fail to learn) after N LoRA steps (`head_rank.lora_learnability`).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from head_rank import CONFIG, lora_learnability  # benchmarks/ is on sys.path when a script runs
from thinwire.config import load_config
from thinwire.models import healing, surgery
from thinwire.models import small as S

PROBE_SEED = 999


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heal-steps", type=int, default=None, help="heal fresh variants for this many steps")
    parser.add_argument("--recipes", default=f"{S.LAYERS}:{S.KEEP_LAST}:{S.MLP_WIDTH}",
                        help="comma-separated layers:keep_last:mlp_width[:head_rank]")
    parser.add_argument("--focus", default="all", help="comma-separated healing foci (all, response)")
    parser.add_argument("--per-family", type=int, default=healing.HEAL_PER_FAMILY, help="healing examples per family")
    parser.add_argument("--lora-steps", type=int, default=0, help="also LoRA-tune each model this many steps")
    parser.add_argument("--lora-tasks", default="uppercase,last-item,capital-of", help="families LoRA tunes on")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinwire.models.smollm2 import prepare

    source = prepare()
    large = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, local_files_only=True).eval()
    for p in large.parameters():
        p.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    probe = healing.probe_batches(tokenizer, PROBE_SEED)
    rows = []
    if args.heal_steps is None:
        model, _ = S.load_small(S.NAME, 0)
        info = S.describe()
        rows.append((f"cached {S.NAME}: {info['layers']} layers, last {info['keep_last']} kept, "
                     f"MLP {info['mlp_width'] or 'whole'}, focus {info['heal_focus']}",
                     model.eval(), float("nan")))
    else:
        hidden = healing.final_hidden_states(large, tokenizer)
        for recipe in args.recipes.split(","):
            layers, keep_last, width, rank = ([*map(int, recipe.split(":")), S.HEAD_RANK])[:4]
            head = surgery.factorised_head(large, hidden, rank) if rank else None
            for focus in args.focus.split(","):
                model = S.cut_down(large, tokenizer, layers, keep_last, width, head)
                ratio = surgery.forward_flops_per_token(model) / surgery.forward_flops_per_token(large)
                started = time.perf_counter()
                healing.heal(model, large, tokenizer, args.heal_steps, per_family=args.per_family, focus=focus)
                rows.append((f"{layers} layers, last {keep_last} kept, MLP {width or 'whole'}, head rank "
                             f"{rank or 'full'}, focus {focus}, {args.heal_steps} steps, {ratio:.3f} of the FLOPs",
                             model, time.perf_counter() - started))
    lora_config = load_config(CONFIG).model
    lora_tasks = args.lora_tasks.split(",")
    table = Table(title="small model against SmolLM2-135M on held-out suite examples")
    lora_columns = ("LoRA loss before", f"after {args.lora_steps} steps") if args.lora_steps else ()
    for column in ("model", "KL response", "KL prompt", "CE small", "CE large", *lora_columns, "heal s"):
        table.add_column(column, justify="right")
    for label, model, seconds in rows:
        c = healing.closeness(model, large, probe)
        lora = lora_learnability(model, tokenizer, lora_config, lora_tasks, args.lora_steps) if args.lora_steps else ()
        table.add_row(label, *(f"{c[k]:.3f}" for k in ("kl_response", "kl_prompt", "ce_small", "ce_large")),
                      *(f"{v:.3f}" for v in lora), f"{seconds:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
