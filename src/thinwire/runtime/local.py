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
from thinwire.data import Federation, build_federation
from thinwire.evaluate import evaluate_splits
from thinwire.methods import MethodSpec, get_method
from thinwire.methods.base import ClientState, Reply, RunContext, Workbench
from thinwire.runtime import records
from thinwire.runtime.display import console, make_progress, summary_table
from thinwire.runtime.rundir import RunDir
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


def _federate(config: Config, spec: MethodSpec, federation: Federation, run_dir: RunDir,
              quiet: bool) -> tuple[dict[str, Any], Payload]:
    fed = config.federation
    started = time.perf_counter()
    workbench = Workbench(config)
    ctx = RunContext(config, workbench)
    server, client = spec.server(ctx), spec.client(ctx)
    states = {cid: ClientState() for cid in range(fed.clients)}

    def evaluate_global() -> dict[str, float]:
        return evaluate_splits(server.eval_model(), workbench.tokenizer, federation.eval_splits(),
                               config.eval, config.data.max_length)

    progress = make_progress()
    rounds: list[dict[str, Any]] = []
    with progress if not quiet else contextlib.nullcontext():
        rounds_bar = progress.add_task("rounds", total=fed.rounds)
        clients_bar = progress.add_task("clients", total=fed.clients_per_round)
        steps_bar = progress.add_task("steps", total=client.steps_per_round())
        ctx.on_step = lambda: progress.advance(steps_bar)
        server.setup()
        base_eval = evaluation = evaluate_global()
        for rnd in range(1, fed.rounds + 1):
            round_start = time.perf_counter()
            sampled = sample_clients(config, rnd)
            progress.reset(clients_bar)
            replies, clients, local_s = [], [], 0.0
            for cid in sampled:
                progress.reset(steps_bar)
                t0 = time.perf_counter()
                down_bytes = server.download(rnd, cid).encode()
                upload = client.fit(rnd, cid, Payload.decode(down_bytes), federation.clients[cid], states[cid])
                up_bytes = upload.payload.encode()
                local_s += time.perf_counter() - t0
                replies.append(Reply(cid, Payload.decode(up_bytes), upload.num_examples, upload.metrics))
                clients.append({"client": cid, "downlink_bytes": len(down_bytes), "uplink_bytes": len(up_bytes),
                                "examples": upload.num_examples, **upload.metrics})
                progress.advance(clients_bar)
            t0 = time.perf_counter()
            aggregate = server.aggregate(rnd, replies)
            aggregate_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            evaluated = rnd == fed.rounds or (config.eval.every and rnd % config.eval.every == 0)
            if evaluated:
                evaluation = evaluate_global()
            times = {"local": local_s, "aggregate": aggregate_s, "eval": time.perf_counter() - t0,
                     "total": time.perf_counter() - round_start}
            rounds.append(records.round_record(rnd, spec.name, sampled, clients, aggregate,
                                               evaluation if evaluated else None, times))
            run_dir.log_round(rounds[-1])
            progress.advance(rounds_bar)
    summary = records.summary(config, spec.name, rounds, base_eval, evaluation, server.trainable_parameters(),
                              workbench.base_parameters(), time.perf_counter() - started)
    return summary, server.final_state()
