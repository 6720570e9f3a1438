"""What every runtime writes: the per-round record of metrics.jsonl and the run's summary.json.

Functions of what the runtime observed (and the round's closing step, shared so that both
runtimes aggregate, evaluate and time a round the same way), so the local and Flower runtimes
report the same fields computed the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from thinwire.config import Config
from thinwire.evaluate import score_splits, split_metrics
from thinwire.runtime.rundir import peak_rss_mb


def too_few_reason(accepted: int, needed: int) -> str:
    """Why a reply that arrived was not used: its round fell short of `federation.min_replies`."""
    return f"reply discarded: {accepted} of the {needed} replies the round needs (federation.min_replies)"


def evaluate_global(config: Config, server: Any, tokenizer: Any, federation: Any, run_dir: Any) -> dict[str, float]:
    """Score the server's current model on every evaluation split, keep the per-example records in
    the run directory (`predictions.jsonl`) and return the metrics (both runtimes)."""
    scored = score_splits(server.eval_model(), tokenizer, federation.eval_splits(), config.eval, config.data.max_length)
    run_dir.save_predictions(scored)
    return split_metrics(scored)


def close_round(config: Config, server: Any, rnd: int, replies: list[Any], skipped: bool,
                evaluate: Callable[[], dict[str, float]], local_s: float,
                round_start: float) -> tuple[dict[str, float], dict[str, float] | None, dict[str, float]]:
    """Aggregate the round's accepted replies and evaluate if this round is due.

    Returns (aggregate metrics, the evaluation or None, the round's times in seconds).
    """
    t0 = time.perf_counter()
    aggregate = {} if skipped else server.aggregate(rnd, replies)
    aggregate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    due = rnd == config.federation.rounds or (config.eval.every and rnd % config.eval.every == 0)
    evaluation = evaluate() if due else None
    times = {"local": local_s, "aggregate": aggregate_s, "eval": time.perf_counter() - t0,
             "total": time.perf_counter() - round_start}
    return aggregate, evaluation, times


def round_record(rnd: int, method: str, sampled: list[int], clients: list[dict[str, Any]],
                 aggregate: dict[str, float], evaluation: dict[str, float] | None,
                 time_s: dict[str, float], *, failures: list[dict[str, Any]] | None = None,
                 rejected: list[dict[str, Any]] | None = None, retries: int = 0, skipped: bool = False,
                 **extra: Any) -> dict[str, Any]:
    """One line of metrics.jsonl; `clients` holds one dict per client whose update was aggregated.

    `failures`: clients that did not reply in time or whose local work raised ({client, reason});
    `rejected`: replies that failed validation ({client, reason}); `retries`: how often the round
    was resampled for want of replies; `skipped`: the round aggregated nothing.
    """
    losses = [c["train_loss"] for c in clients if "train_loss" in c]
    return {
        "round": rnd, "method": method, "clients_sampled": len(sampled), "clients_ok": len(clients),
        "uplink_bytes": sum(c["uplink_bytes"] for c in clients),
        "downlink_bytes": sum(c["downlink_bytes"] for c in clients),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "eval": evaluation, "aggregate": aggregate, "clients": clients, "time_s": time_s,
        "failures": list(failures or []), "rejected": list(rejected or []), "retries": retries,
        "skipped": skipped, **extra,
    }


def summary(config: Config, method: str, rounds: list[dict[str, Any]], base_eval: dict[str, float],
            final_eval: dict[str, float], trainable_parameters: int, base_parameters: int,
            wall_s: float, **extra: Any) -> dict[str, Any]:
    fed = config.federation
    up = sum(r["uplink_bytes"] for r in rounds)
    down = sum(r["downlink_bytes"] for r in rounds)
    client_rounds = max(1, sum(r["clients_ok"] for r in rounds))
    return {
        "method": method, "model": config.model.name, "rounds": len(rounds), "clients": fed.clients,
        "clients_per_round": fed.clients_per_round, "seed": fed.seed,
        "base_eval": base_eval, "final_eval": final_eval,
        "uplink_bytes_total": up, "downlink_bytes_total": down,
        "uplink_bytes_per_client_round": up / client_rounds,
        "downlink_bytes_per_client_round": down / client_rounds,
        "trainable_parameters": trainable_parameters,
        "fedavg_bytes_per_client_round": 4 * base_parameters,
        "wall_s": wall_s, "peak_rss_mb": peak_rss_mb(),
        "failures_total": sum(len(r.get("failures", [])) for r in rounds),
        "rejected_total": sum(len(r.get("rejected", [])) for r in rounds),
        "retries_total": sum(r.get("retries", 0) for r in rounds),
        "skipped_rounds": sum(bool(r.get("skipped")) for r in rounds), **extra,
    }
