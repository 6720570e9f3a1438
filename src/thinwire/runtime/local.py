"""The in-process runtime: a whole federated run, read top to bottom.

Clients run one after another over the workbench's single model, so memory does not grow with
the number of clients. Every download and upload is encoded to bytes, counted, and decoded
again before the other side sees it: the method only ever gets what crossed the wire.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from thinwire.config import Config
from thinwire.data import build_federation
from thinwire.evaluate import evaluate_splits
from thinwire.methods import get_method
from thinwire.methods.base import ClientState, Reply, RunContext, Workbench
from thinwire.runtime.display import console, make_progress, summary_table
from thinwire.runtime.rundir import RunDir, peak_rss_mb
from thinwire.seeding import derive_seed
from thinwire.wire import Payload


def sample_clients(config: Config, rnd: int) -> list[int]:
    """The round's clients: a seeded draw without replacement, independent of earlier rounds."""
    fed = config.federation
    rng = np.random.default_rng(derive_seed(fed.seed, "sample", rnd))
    return sorted(rng.choice(fed.clients, size=fed.clients_per_round, replace=False).tolist())


def run_local(config: Config, out: Path, quiet: bool = False) -> dict[str, Any]:
    spec = get_method(config.method.name)
    federation = build_federation(config)
    run_dir = RunDir(out)
    run_dir.open(config)
    try:
        summary, final_state = _federate(config, spec, federation, run_dir, quiet)
    except BaseException:
        run_dir.abandon()
        raise
    run_dir.finish(summary, final_state)
    if not quiet:
        console.print(summary_table(summary))
        console.print(f"run directory: {out}")
    return summary


def _federate(config, spec, federation, run_dir: RunDir, quiet: bool) -> tuple[dict[str, Any], Payload]:
    fed = config.federation
    started = time.perf_counter()
    workbench = Workbench(config)
    progress = make_progress()
    steps_per_client = config.train.local_steps
    ctx = RunContext(config, workbench)
    server, client = spec.server(ctx), spec.client(ctx)
    states = {cid: ClientState() for cid in range(fed.clients)}

    def evaluate_global() -> dict[str, float]:
        return evaluate_splits(server.eval_model(), workbench.tokenizer, federation.eval_splits(),
                               config.eval, config.data.max_length)

    up_total = down_total = 0
    with progress if not quiet else contextlib.nullcontext():
        rounds_bar = progress.add_task("rounds", total=fed.rounds)
        clients_bar = progress.add_task("clients", total=fed.clients_per_round)
        steps_bar = progress.add_task("steps", total=steps_per_client)
        ctx.on_step = lambda: progress.advance(steps_bar)
        server.setup()
        base_eval = evaluate_global()
        eval_result = base_eval
        for rnd in range(1, fed.rounds + 1):
            round_start = time.perf_counter()
            sampled = sample_clients(config, rnd)
            progress.reset(clients_bar)
            replies, per_client, local_s = [], [], 0.0
            for cid in sampled:
                progress.reset(steps_bar)
                t0 = time.perf_counter()
                down_bytes = server.download(rnd, cid).encode()
                upload = client.fit(rnd, cid, Payload.decode(down_bytes), federation.clients[cid], states[cid])
                up_bytes = upload.payload.encode()
                local_s += time.perf_counter() - t0
                replies.append(Reply(cid, Payload.decode(up_bytes), upload.num_examples, upload.metrics))
                per_client.append({"client": cid, "downlink_bytes": len(down_bytes),
                                   "uplink_bytes": len(up_bytes), "examples": upload.num_examples,
                                   **upload.metrics})
                progress.advance(clients_bar)
            t0 = time.perf_counter()
            agg_metrics = server.aggregate(rnd, replies)
            aggregate_s = time.perf_counter() - t0
            evaluated = rnd == fed.rounds or (config.eval.every and rnd % config.eval.every == 0)
            t0 = time.perf_counter()
            if evaluated:
                eval_result = evaluate_global()
            eval_s = time.perf_counter() - t0
            up = sum(c["uplink_bytes"] for c in per_client)
            down = sum(c["downlink_bytes"] for c in per_client)
            up_total, down_total = up_total + up, down_total + down
            losses = [c["train_loss"] for c in per_client if "train_loss" in c]
            run_dir.log_round({
                "round": rnd, "method": spec.name, "clients_sampled": len(sampled),
                "clients_ok": len(replies), "uplink_bytes": up, "downlink_bytes": down,
                "train_loss": sum(losses) / len(losses) if losses else None,
                "eval": eval_result if evaluated else None, "aggregate": agg_metrics,
                "clients": per_client,
                "time_s": {"local": local_s, "aggregate": aggregate_s, "eval": eval_s,
                           "total": time.perf_counter() - round_start},
            })
            progress.advance(rounds_bar)
    client_rounds = fed.rounds * fed.clients_per_round
    summary = {
        "method": spec.name, "model": config.model.name, "rounds": fed.rounds,
        "clients": fed.clients, "clients_per_round": fed.clients_per_round, "seed": fed.seed,
        "base_eval": base_eval, "final_eval": eval_result,
        "uplink_bytes_total": up_total, "downlink_bytes_total": down_total,
        "uplink_bytes_per_client_round": up_total / client_rounds,
        "downlink_bytes_per_client_round": down_total / client_rounds,
        "trainable_parameters": server.trainable_parameters(),
        "fedavg_bytes_per_client_round": 4 * workbench.base_parameters(),
        "wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(),
    }
    return summary, server.final_state()
