"""Base-model quality per built-in task family: which families a model already solves.

    python benchmarks/task_baseline.py --model smollm2-135m --examples 16
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from thinwire.config import EvalConfig, ModelConfig
from thinwire.data.tasks import FAMILIES, generate
from thinwire.evaluate import exact_match, generate as greedy, rouge_l
from thinwire.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    model, tokenizer = load_model(ModelConfig(name=args.model), seed=0)
    table = Table(title=f"base {args.model}, {args.examples} examples per family, greedy, Alpaca template")
    for col in ("family", "category", "exact match", "Rouge-L", "sample prediction"):
        table.add_column(col)
    started, em_all, rl_all = time.perf_counter(), [], []
    with torch.inference_mode():
        for name, family in FAMILIES.items():
            examples = generate(name, args.examples, args.seed)
            preds = greedy(model, tokenizer, examples, EvalConfig().batch_size, args.max_new_tokens)
            em = sum(exact_match(p, e["output"]) for p, e in zip(preds, examples)) / len(examples)
            rl = sum(rouge_l(p, e["output"]) for p, e in zip(preds, examples)) / len(examples)
            em_all.append(em)
            rl_all.append(rl)
            table.add_row(name, family.category, f"{em:.3f}", f"{rl:.3f}", repr(preds[0][:40]))
    table.add_row("mean", "", f"{sum(em_all) / len(em_all):.3f}", f"{sum(rl_all) / len(rl_all):.3f}",
                  f"{time.perf_counter() - started:.0f} s")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
