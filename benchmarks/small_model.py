"""How close is the small model to the large one where it matters? KL and cross-entropy of
`smollm2-small` against SmolLM2-135M on held-out suite examples, on the response positions (the
only ones proxy-tuning and evaluation score) and on the prompt's.

Without `--heal-steps` it reads the cached model (`THINWIRE_CACHE` and the `THINWIRE_SMALL_*`
recipe variables pick which). With it, it builds the small model of each `--recipes` × `--focus`
in memory and heals it for that many steps first: a quick comparison of recipes at the same FLOPs.
A recipe is layers:keep_last:mlp_width[:head_rank] (mlp_width 0 keeps the MLPs whole; head_rank
defaults to the built-in's, 0 keeps the full tied head).

    python benchmarks/small_model.py
    python benchmarks/small_model.py --heal-steps 60 --recipes 11:0:0,11:1:0,15:1:1024,20:1:640,30:0:256
    python benchmarks/small_model.py --heal-steps 60 --recipes 30:0:256:96,30:0:160:192
    python benchmarks/small_model.py --heal-steps 60 --recipes 11:0:0,11:1:0 --focus all,response
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from thinwire.models import small as S

PROBE_SEED = 999


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heal-steps", type=int, default=None, help="heal fresh variants for this many steps")
    parser.add_argument("--recipes", default=f"{S.LAYERS}:{S.KEEP_LAST}:{S.MLP_WIDTH}",
                        help="comma-separated layers:keep_last:mlp_width[:head_rank]")
    parser.add_argument("--focus", default="all", help="comma-separated healing foci (all, response)")
    parser.add_argument("--per-family", type=int, default=S.HEAL_PER_FAMILY, help="healing examples per family")
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
    probe = S.probe_batches(tokenizer, PROBE_SEED)
    rows = []
    if args.heal_steps is None:
        model, _ = S.load_small(S.NAME, 0)
        info = S.describe()
        rows.append((f"cached {S.NAME}: {info['layers']} layers, last {info['keep_last']} kept, "
                     f"MLP {info['mlp_width'] or 'whole'}, focus {info['heal_focus']}",
                     S.closeness(model.eval(), large, probe), float("nan")))
    else:
        hidden = S.final_hidden_states(large, tokenizer)
        for recipe in args.recipes.split(","):
            layers, keep_last, width, rank = ([*map(int, recipe.split(":")), S.HEAD_RANK])[:4]
            head = S.factorised_head(large, hidden, rank) if rank else None
            for focus in args.focus.split(","):
                model = S.cut_down(large, tokenizer, layers, keep_last, width, head)
                ratio = S.forward_flops_per_token(model) / S.forward_flops_per_token(large)
                started = time.perf_counter()
                S.heal(model, large, tokenizer, args.heal_steps, per_family=args.per_family, focus=focus)
                rows.append((f"{layers} layers, last {keep_last} kept, MLP {width or 'whole'}, head rank "
                             f"{rank or 'full'}, focus {focus}, {args.heal_steps} steps, {ratio:.3f} of the FLOPs",
                             S.closeness(model, large, probe), time.perf_counter() - started))
    table = Table(title="small model against SmolLM2-135M on held-out suite examples")
    for column in ("model", "KL response", "KL prompt", "CE small", "CE large", "heal s"):
        table.add_column(column, justify="right")
    for label, c, seconds in rows:
        table.add_row(label, *(f"{c[k]:.3f}" for k in ("kl_response", "kl_prompt", "ce_small", "ce_large")),
                      f"{seconds:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
