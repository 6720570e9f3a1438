"""FedPT against its baselines, in one run family (same data, seed, rounds, local training):

    fedit-small   FedIT on the small model alone        method.name=fedit  model.name=<small>
    fedavg+pt     FedIT on the small model, proxy-tune   method.name=fedpt  method.fedpt.distill=false
    fedpt         FedPT (proxy-tune + distil each round) method.name=fedpt
    fedpt-bcast   FedPT, anti-expert = broadcast model   method.fedpt.anti=broadcast   (--ablation)
    fedpt-danti   FedPT, anti-expert distilled from large method.fedpt.anti=distilled   (--ablation)
    fedit-large   FedIT directly on the large model      method.name=fedit  model.name=<large>

Prints quality of the evaluated model (the proxy-tuned large model for the fedpt rows), device
compute (forward FLOPs per token of the model a device trains, from parameter counts), bytes per
client-round and wall time.

    python benchmarks/fedpt.py                      # tiny pair (tiny-small → tiny), seconds
    python benchmarks/fedpt.py --model smollm2 --rounds 2 --set eval.max_examples=16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from thinwire.config import EXAMPLES
from thinwire.config import ModelConfig, load_config
from thinwire.models import load_model
from thinwire.models.surgery import forward_flops_per_token
from thinwire.runtime.local import run_local

PAIRS = {"tiny": ("tiny-small", "tiny"), "smollm2": ("smollm2-small", "smollm2-135m")}


def variants(small: str, large: str, ablation: bool) -> list[tuple[str, list[str], str]]:
    """(label, overrides, model devices train)."""
    fedpt = ["method.name='fedpt'", f"model.name='{small}'", f"method.fedpt.large='{large}'"]
    rows = [
        ("fedit-small", ["method.name='fedit'", f"model.name='{small}'"], small),
        ("fedavg+pt", [*fedpt, "method.fedpt.distill=false"], small),
        ("fedpt", fedpt, small),
    ]
    if ablation:
        rows.append(("fedpt-bcast", [*fedpt, "method.fedpt.anti='broadcast'"], small))
        rows.append(("fedpt-danti", [*fedpt, "method.fedpt.anti='distilled'"], small))
    rows.append(("fedit-large", ["method.name='fedit'", f"model.name='{large}'"], large))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(PAIRS), default="tiny")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--ablation", action="store_true", help="also run anti = broadcast and anti = distilled")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    small, large = PAIRS[args.model]
    base = [f"federation.rounds={args.rounds}", "eval.every=0"]
    if args.model == "smollm2":
        base += ["train.lr=3e-4", "eval.max_examples=12", "data.max_length=128"]
    flops = {name: forward_flops_per_token(load_model(ModelConfig(name=name, device="cpu"), 0)[0])
             for name in (small, large)}
    table = Table(title=f"FedPT vs baselines, {small} → {large}, {args.rounds} rounds (smoke data)")
    for col in ("run", "eval model", "loss", "Rouge-L", "EM", "device GFLOP/token", "up B/client-round",
                "down B/client-round", "wall s"):
        table.add_column(col, justify="right" if col not in ("run", "eval model") else "left")
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides, device_model in variants(small, large, args.ablation):
            config = load_config(EXAMPLES / "smoke.toml", [*base, *overrides, *args.set])
            started = time.perf_counter()
            s = run_local(config, Path(tmp) / label, quiet=True)
            wall = time.perf_counter() - started
            e = s["final_eval"]
            evaluated = f"proxy({large})" if label.startswith("fedavg") or label.startswith("fedpt") else device_model
            table.add_row(label, evaluated, f"{e['loss']:.3f}", f"{e.get('rougeL', float('nan')):.3f}",
                          f"{e.get('exact_match', float('nan')):.3f}", f"{flops[device_model] / 1e9:.4f}",
                          f"{s['uplink_bytes_per_client_round']:,.0f}", f"{s['downlink_bytes_per_client_round']:,.0f}",
                          f"{wall:.0f}")
            Console().print(f"{label}: base loss {s['base_eval']['loss']:.3f} → {e['loss']:.3f} ({wall:.0f} s)")
    Console(width=160).print(table)
    Console().print(f"device compute ratio small/large: {flops[small] / flops[large]:.3f} "
                    f"(forward FLOPs per token, 2 x weights used, LM head included)")


if __name__ == "__main__":
    main()
