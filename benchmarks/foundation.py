"""Foundation figures: wire framing overhead, runtime training throughput against a bare loop,
and peak memory with 4 against 40 clients (same clients per round).

    python benchmarks/foundation.py --model smollm2-135m
    python benchmarks/foundation.py --model tiny --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from thinwire.config import EXAMPLES
from thinwire.config import load_config
from thinwire.data import build_federation
from thinwire.methods import get_method
from thinwire.methods.base import ClientState, RunContext, Workbench
from thinwire.seeding import derive_seed
from thinwire.train.first_order import batch_stream, make_optimizer
from thinwire.wire import Payload

console = Console()


def overhead_rows(model: str) -> list[tuple[str, int, int]]:
    rows = []
    for method in ("fedavg", "fedit"):
        config = load_config(EXAMPLES / "smoke.toml", [f"model.name='{model}'", f"method.name='{method}'"])
        _, params = Workbench(config).trainable(lora=method == "fedit")
        raw = sum(p.numel() * p.element_size() for p in params.values())
        encoded = len(Payload(tensors={n: p.detach() for n, p in params.items()}).encode())
        rows.append((method, raw, encoded))
    return rows


def throughput(model: str, method: str, steps: int, repeats: int) -> tuple[float, float]:
    """Tokens/s of the runtime's client.fit against a bare loop over the same batches."""
    config = load_config(EXAMPLES / "smoke.toml", [
        f"model.name='{model}'", f"method.name='{method}'", f"train.local_steps={steps}",
        "train.lr=1e-5", "data.max_length=128"])
    federation = build_federation(config)
    workbench = Workbench(config)
    spec = get_method(method)
    ctx = RunContext(config, workbench)
    server, client = spec.server(ctx), spec.client(ctx)
    server.setup()
    examples = federation.clients[0]
    runtime_rates, bare_rates = [], []
    for rep in range(repeats + 1):
        down = Payload.decode(server.download(1, 0).encode())
        t0 = time.perf_counter()
        upload = client.fit(1, 0, down, examples, ClientState())
        upload.payload.encode()
        runtime_s = time.perf_counter() - t0
        tokens = upload.metrics["tokens"]

        model_, params = workbench.trainable(lora=method == "fedit")
        for name, p in params.items():
            p.data.copy_(down.tensors[name])
        seed = derive_seed(config.federation.seed, "local-train", 1, 0)
        batches = batch_stream(examples, workbench.tokenizer, config.train.batch_size, config.data.max_length,
                               np.random.default_rng(seed))
        optimizer = make_optimizer(list(params.values()), config.train)
        model_.train()
        t0 = time.perf_counter()
        bare_tokens = 0
        for _ in range(steps):
            batch = next(batches)
            loss = model_(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bare_tokens += int(batch["attention_mask"].sum())
        bare_s = time.perf_counter() - t0
        model_.eval()
        if rep:  # the first repetition warms up allocators and kernels
            runtime_rates.append(tokens / runtime_s)
            bare_rates.append(bare_tokens / bare_s)
    return statistics.median(runtime_rates), statistics.median(bare_rates)


def peak_rss(model: str, clients: int, rounds: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "thinwire.cli", "run", str(EXAMPLES / "smoke.toml"), "--quiet",
               "--out", str(out), "--set", f"model.name='{model}'", "--set", "method.name='fedavg'",
               "--set", f"federation.clients={clients}", "--set", "federation.clients_per_round=2",
               "--set", f"federation.rounds={rounds}", "--set", "data.examples_per_client=8",
               "--set", "train.local_steps=2", "--set", "eval.generate=false"]
        subprocess.run(cmd, check=True)
        return json.loads((out / "summary.json").read_text())["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, repeats = (4, 1) if args.quick else (8, 3)

    table = Table(title=f"wire framing overhead ({args.model})")
    for col in ("method", "raw tensor bytes", "encoded payload bytes", "overhead"):
        table.add_column(col, justify="right")
    for method, raw, encoded in overhead_rows(args.model):
        table.add_row(method, f"{raw:,}", f"{encoded:,}", f"{100 * (encoded - raw) / raw:.3f}%")
    console.print(table)

    table = Table(title=f"local training throughput ({args.model}, {steps} steps, median of {repeats})")
    for col in ("method", "runtime tokens/s", "bare loop tokens/s", "runtime / bare"):
        table.add_column(col, justify="right")
    for method in ("fedavg", "fedit"):
        ours, bare = throughput(args.model, method, steps, repeats)
        table.add_row(method, f"{ours:,.0f}", f"{bare:,.0f}", f"{100 * ours / bare:.1f}%")
    console.print(table)

    rounds = 2 if args.quick else 3
    small, large = peak_rss(args.model, 4, rounds), peak_rss(args.model, 40, rounds)
    table = Table(title=f"peak RSS, fedavg, 2 clients per round, {rounds} rounds ({args.model})")
    for col in ("4 clients", "40 clients", "40 / 4"):
        table.add_column(col, justify="right")
    table.add_row(f"{small:,.0f} MB", f"{large:,.0f} MB", f"{large / small:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
