"""How close is the small model to the large one where it matters? KL and cross-entropy of
`smollm2-small` against SmolLM2-135M on held-out suite examples, on the response positions (the
only ones proxy-tuning and evaluation score) and on the prompt's.

Without `--heal-steps` it reads the cached model (`THINWIRE_CACHE` and the `THINWIRE_SMALL_*`
recipe variables pick which). With it, it builds the small model of each `--keep-last` × `--focus`
in memory and heals it for that many steps first: a quick comparison of recipes.

    python benchmarks/small_model.py
    python benchmarks/small_model.py --heal-steps 60 --keep-last 0,1 --focus all,response
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from rich.console import Console
from rich.table import Table

from thinwire.models import small as S

PROBE_SEED = 999


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heal-steps", type=int, default=None, help="heal fresh variants for this many steps")
    parser.add_argument("--keep-last", default="0", help="comma-separated counts of the large model's last layers kept")
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
        rows.append((f"cached {S.NAME}: {info['layers']} layers, last {info['keep_last']} kept, focus {info['heal_focus']}",
                     S.closeness(model.eval(), large, probe), float("nan")))
    else:
        head = S.factorised_head(large, S.final_hidden_states(large, tokenizer), S.HEAD_RANK)
        for keep_last in (int(k) for k in args.keep_last.split(",")):
            for focus in args.focus.split(","):
                model = S.truncate(large, S.LAYERS, keep_last)
                S.install_head(model, copy.deepcopy(head))
                started = time.perf_counter()
                S.heal(model, large, tokenizer, args.heal_steps, per_family=args.per_family, focus=focus)
                rows.append((f"{S.LAYERS} layers, last {keep_last} kept, focus {focus}, {args.heal_steps} steps",
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
