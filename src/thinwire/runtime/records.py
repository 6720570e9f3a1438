"""What every runtime writes: the per-round record of metrics.jsonl and the run's summary.json.

Pure functions of what the runtime observed, so the local and Flower runtimes report the
same fields computed the same way.
"""

from __future__ import annotations

from typing import Any

from thinwire.config import Config
from thinwire.runtime.rundir import peak_rss_mb


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
