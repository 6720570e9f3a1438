"""A finished FedPT run's proxy-tuned large model evaluated at other strengths α, without retraining.

With `method.fedpt.distill = false` (FedAvg+PT) α enters only at evaluation, so each row is exactly
what a run at that α would report. With distillation α also shaped the adapter during training,
so the sweep shows the evaluation-time effect only. α = 0 is the large model alone.

A FedIT run on the small model is FedAvg+PT's training exactly (the same clients, steps and
aggregation; FedAvg+PT only evaluates differently), so its final adapter is proxy-tuned as the
expert of a FedAvg+PT run with the default large model: no second run needed.

    python benchmarks/fedpt_alpha.py runs/variants/fedavg-pt --alphas 0,0.5,1,1.5
    python benchmarks/fedpt_alpha.py runs/variants/fedit-small --alphas 1
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from thinwire.config import Config, load_config
from thinwire.data import build_federation
from thinwire.evaluate import evaluate_splits
from thinwire.methods import get_method
from thinwire.methods.base import RunContext, Workbench
from thinwire.methods.fedpt import FedPTServer
from thinwire.models import SMALL_MODELS
from thinwire.wire import Payload


def adapters(final: Payload, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in final.tensors.items() if k.startswith(prefix)}


def fedpt_config(run_dir: Path) -> Config:
    """The resolved config of a FedPT run directory, or of the FedAvg+PT run a FedIT run on a small
    model trained for (SystemExit for any other run)."""
    config = load_config(run_dir / "config.toml")
    if config.method.name == "fedit" and config.model.name in SMALL_MODELS:
        return load_config(run_dir / "config.toml", ["method.name='fedpt'", "method.fedpt.distill=false"])
    if config.method.name != "fedpt":
        raise SystemExit(f"{run_dir} is a {config.method.name} run on {config.model.name}; pass a fedpt run "
                         f"directory or a fedit one on {' or '.join(SMALL_MODELS)}")
    return config


def fedpt_server(config: Config) -> tuple[Workbench, FedPTServer]:
    """A set-up FedPT server (small model, black-box large model) for `config`."""
    workbench = Workbench(config)
    server = get_method("fedpt").server(RunContext(config, workbench))
    server.setup()
    return workbench, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished fedpt run directory")
    parser.add_argument("--alphas", default="0,0.5,1,1.5", help="comma-separated strengths")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = fedpt_config(args.run_dir)
    final = Payload.decode((args.run_dir / "final_state.safetensors").read_bytes())
    workbench, server = fedpt_server(config)
    server.expert = adapters(final, "expert/") or dict(final.tensors)  # a FedIT run's state is the adapter
    server.anti_weights = adapters(final, "anti/") or None
    splits = build_federation(config).eval_splits()

    table = Table(title=f"{args.run_dir.name}: proxy-tuned {server.options.large} by α "
                        f"(small {config.model.name}, distill={server.options.distill})")
    for column in ("α", "loss", "Rouge-L", "exact match", "eval s"):
        table.add_column(column, justify="right")
    for alpha in (float(a) for a in args.alphas.split(",")):
        server.options = dataclasses.replace(server.options, alpha=alpha)
        started = time.perf_counter()
        scores = evaluate_splits(server.eval_model(), workbench.tokenizer, splits, config.eval, config.data.max_length)
        table.add_row(f"{alpha:g}", f"{scores['loss']:.3f}", f"{scores.get('rougeL', float('nan')):.3f}",
                      f"{scores.get('exact_match', float('nan')):.3f}", f"{time.perf_counter() - started:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
