"""What every runtime writes: the per-round record of metrics.jsonl and the run's summary.json.

Functions of what the runtime observed (and the round's closing step, shared so that both
runtimes aggregate, evaluate and time a round the same way), so the local and Flower runtimes
report the same fields computed the same way.

Traffic is every byte sent, whatever became of it. A round's entries are its aggregated
`clients` plus its `failures` and `rejected` (every attempt of a retried round included); each
entry carries the `downlink_bytes` the server sent it and the `uplink_bytes` that came back, when
anything was sent (a client the server never reached has neither). The round's
`uplink_bytes`/`downlink_bytes` are sums over all of them; `*_accepted` over `clients` only.
A *client-round* is one download sent to one client (`clients_contacted` per round; a client
contacted again in a retry of the round counts again).

A client record keeps what the runtime measured at its top level and the client's own metrics
(`Upload.metrics`, e.g. `train_loss`, and on Flower its own timings `clientapp_age_s`, `import_s`,
`setup_s`) under `metrics`, so a client can never replace a measured figure; validation
(methods/validate.py) admits only finite numbers of sane magnitude there.
metrics.jsonl is strict JSON (rundir.json_line): a non-finite number the server computed is written as null.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thinwire.config import Config
from thinwire.evaluate import evaluation_work, score_splits, split_metrics
from thinwire.runtime.commit import Commit, commit_round
from thinwire.runtime.rundir import peak_rss_mb

TRAFFIC = ("uplink_bytes", "downlink_bytes")


def too_few_reason(accepted: int, needed: int) -> str:
    """Why a reply that arrived was not used: its round fell short of `federation.min_replies`."""
    return f"reply discarded: {accepted} of the {needed} replies the round needs (federation.min_replies)"


def client_record(cid: int, downlink_bytes: int, uplink_bytes: int, examples: int, metrics: dict[str, Any],
                  **measured: Any) -> dict[str, Any]:
    """An aggregated client's entry: the runtime's measurements (bytes, example count, `measured`)
    at the top level, the client's own `metrics` under their own key."""
    return {"client": cid, "downlink_bytes": downlink_bytes, "uplink_bytes": uplink_bytes, "examples": examples,
            **measured, "metrics": dict(metrics)}


def failure(cid: int, reason: str, downlink_bytes: int | None = None,
            uplink_bytes: int | None = None) -> dict[str, Any]:
    """A `failures` (or `rejected`) entry: the client, why, and the bytes that crossed the wire
    for it (None: nothing was sent that way)."""
    entry: dict[str, Any] = {"client": cid, "reason": reason}
    if downlink_bytes is not None:
        entry["downlink_bytes"] = downlink_bytes
    if uplink_bytes is not None:
        entry["uplink_bytes"] = uplink_bytes
    return entry


def discarded(clients: list[dict[str, Any]], needed: int) -> list[dict[str, Any]]:
    """The `failures` entries of replies that arrived in a round with too few of them: their bytes
    crossed the wire, their updates are not used."""
    reason = too_few_reason(len(clients), needed)
    return [failure(c["client"], reason, c["downlink_bytes"], c["uplink_bytes"]) for c in clients]


class Warnings:
    """The run's warnings (`RunContext.warnings`) not yet written to a round record."""

    def __init__(self, ctx: Any):
        self.ctx, self.mark = ctx, 0

    def take(self) -> list[str]:
        new = list(self.ctx.warnings[self.mark:])
        self.mark = len(self.ctx.warnings)
        return new


def evaluate_global(config: Config, server: Any, tokenizer: Any, federation: Any, run_dir: Any,
                    display: Any = None) -> dict[str, float]:
    """Score the server's current model on every evaluation split, keep the per-example records in
    the run directory (`predictions.jsonl`) and return the metrics (both runtimes); `display`
    (a `RunDisplay`) shows its progress."""
    splits = federation.eval_splits()
    on_batch = display.evaluation(evaluation_work(splits, config.eval)) if display is not None else None
    scored = score_splits(server.eval_model(), tokenizer, splits, config.eval, config.data.max_length, on_batch)
    run_dir.save_predictions(scored)
    return split_metrics(scored)


def close_round(config: Config, server: Any, rnd: int, replies: list[Any], skipped: bool,
                evaluate: Callable[[], dict[str, float]], local_s: float,
                round_start: float) -> tuple[Commit, dict[str, float] | None, dict[str, float]]:
    """Aggregate the round's accepted replies (runtime/commit.py: never into a model that fails
    the checks) and evaluate if this round is due.

    Returns (what the aggregation committed, the evaluation or None, the round's times in seconds).
    """
    t0 = time.perf_counter()
    committed = Commit() if skipped else commit_round(server, rnd, replies)
    aggregate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    due = rnd == config.federation.rounds or (config.eval.every and rnd % config.eval.every == 0)
    evaluation = evaluate() if due else None
    times = {"local": local_s, "aggregate": aggregate_s, "eval": time.perf_counter() - t0,
             "total": time.perf_counter() - round_start}
    return committed, evaluation, times


def apply_commit(clients: list[dict[str, Any]], committed: Commit, pooled: bool,
                 private: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The client records of the replies `committed` kept, each with the update norm the server
    measured (and its clip factor when clipped) unless `private` (DP or SecAgg+: no per-client
    figure is logged), and `rejected` entries (with their bytes) for those it dropped. `pooled`: the
    round's one reply stood for every client (SecAgg), who share its fate."""
    dropped = {entry["client"]: entry["reason"] for entry in committed.dropped}
    if pooled and dropped:
        reason = next(iter(dropped.values()))
        dropped = {c["client"]: reason for c in clients}
    kept = [c for c in clients if c["client"] not in dropped]
    for c in kept:
        norm = None if private else committed.norms.get(c["client"])
        if norm is not None:
            c["update_norm"] = norm if math.isfinite(norm) else None
            bound = committed.metrics.get("norm_bound")
            if bound is not None and not norm <= bound:
                c["clip_factor"] = bound / norm if math.isfinite(norm) and norm > 0 else 0.0
    gone = [failure(c["client"], dropped[c["client"]], c["downlink_bytes"], c["uplink_bytes"])
            for c in clients if c["client"] in dropped]
    return kept, gone


def round_record(rnd: int, method: str, sampled: list[int], clients: list[dict[str, Any]],
                 aggregate: dict[str, float], evaluation: dict[str, float] | None,
                 time_s: dict[str, float], *, phase: str | None = None,
                 failures: list[dict[str, Any]] | None = None, rejected: list[dict[str, Any]] | None = None,
                 retries: int = 0, skipped: bool = False, warnings: list[str] = (),
                 **extra: Any) -> dict[str, Any]:
    """One line of metrics.jsonl; `clients` holds one `client_record` per aggregated client.

    `failures`: clients that did not reply in time, whose local work raised, or whose reply came
    in a round with too few (`failure` entries, with the bytes sent); `rejected`: replies that
    failed validation; `retries`: how often the round was resampled for want of replies;
    `skipped`: the round aggregated nothing; `phase`: `ServerSide.phase(rnd)`; `warnings`: those
    the run raised since the previous record; `train_loss`: the median of the aggregated clients'
    claimed `train_loss` (client-reported; the median, so that one client cannot set it). Traffic:
    see the module docstring.
    """
    failures, rejected = list(failures or []), list(rejected or [])
    everyone = [*clients, *failures, *rejected]
    losses = [c["metrics"]["train_loss"] for c in clients if _is_number(c["metrics"].get("train_loss"))]
    return {
        "round": rnd, "method": method, "phase": phase, "clients_sampled": len(sampled),
        "clients_contacted": sum("downlink_bytes" in e for e in everyone), "clients_ok": len(clients),
        **{key: sum(e.get(key, 0) for e in everyone) for key in TRAFFIC},
        **{f"{key}_accepted": sum(c[key] for c in clients) for key in TRAFFIC},
        "train_loss": statistics.median(losses) if losses else None,
        "eval": evaluation, "aggregate": aggregate, "clients": clients, "time_s": time_s,
        "failures": failures, "rejected": rejected, "retries": retries, "skipped": skipped,
        "warnings": list(warnings), **extra,
    }


def traffic_totals(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes over `rounds` (all of a run, or one phase's).

    `*_bytes_total`: every byte sent; `*_bytes_accepted_total`: the aggregated clients' bytes.
    `client_rounds`: downloads sent (every client-round attempted, whatever became of it);
    `client_rounds_accepted`: client-rounds whose update was aggregated.
    `*_bytes_per_client_round`: all bytes sent / `client_rounds` (what one client-round costs,
    faults included); `*_bytes_per_accepted_client_round`: accepted bytes / `client_rounds_accepted`
    (what one aggregated update costs). 0 where the denominator is 0.
    """
    contacted = sum(r["clients_contacted"] for r in rounds)
    accepted = sum(r["clients_ok"] for r in rounds)
    out: dict[str, Any] = {"rounds": len(rounds), "client_rounds": contacted, "client_rounds_accepted": accepted}
    for key in TRAFFIC:
        total, kept = sum(r[key] for r in rounds), sum(r[f"{key}_accepted"] for r in rounds)
        out |= {f"{key}_total": total, f"{key}_accepted_total": kept,
                f"{key}_per_client_round": total / contacted if contacted else 0.0,
                f"{key}_per_accepted_client_round": kept / accepted if accepted else 0.0}
    return out


def phase_totals(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`traffic_totals` per phase, in order of first appearance ({} when the method has no phases)."""
    phases = list(dict.fromkeys(r.get("phase") for r in rounds if r.get("phase") is not None))
    return {p: traffic_totals([r for r in rounds if r.get("phase") == p]) for p in phases}


def summary(config: Config, method: str, rounds: list[dict[str, Any]], base_eval: dict[str, float],
            final_eval: dict[str, float], trainable_parameters: int, wall_s: float, **extra: Any) -> dict[str, Any]:
    """summary.json: whole-run traffic (`traffic_totals`) and, for methods with phases, the same
    figures per phase under `phases` (e.g. CG-FedLLM's `tgap` and `faf`)."""
    fed = config.federation
    totals = traffic_totals(rounds)
    return {
        "method": method, "model": config.model.name, "rounds": len(rounds), "clients": fed.clients,
        "clients_per_round": fed.clients_per_round, "seed": fed.seed,
        "base_eval": base_eval, "final_eval": final_eval,
        **{k: v for k, v in totals.items() if k != "rounds"},
        "phases": phase_totals(rounds),
        "trainable_parameters": trainable_parameters,
        "wall_s": wall_s, "peak_rss_mb": peak_rss_mb(),
        "failures_total": sum(len(r.get("failures", [])) for r in rounds),
        "rejected_total": sum(len(r.get("rejected", [])) for r in rounds),
        "retries_total": sum(r.get("retries", 0) for r in rounds),
        "skipped_rounds": sum(bool(r.get("skipped")) for r in rounds),
        "warnings": [w for r in rounds for w in r.get("warnings", [])], **environment(), **extra,
    }


VERSIONED = ("thinwire", "torch", "transformers", "peft", "flwr")


def environment() -> dict[str, Any]:
    """What a run ran on, so a figure can be traced (summary.json): `versions` (Python and the
    libraries that shape the numbers; None where one is not installed), `git_commit` (of the
    thinwire checkout that ran, "<sha>-dirty" with uncommitted changes; None outside a git checkout)
    and `machine` (CPU cores, memory, accelerator)."""
    import torch

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine = {"platform": platform.platform(), "cpu_cores": os.cpu_count(),
               "memory_gb": round(memory / 1e9, 1) if memory else None, "accelerator": accelerator}
    return {"versions": versions, "git_commit": git_commit(Path(__file__).resolve().parent), "machine": machine}


def git_commit(directory: Path) -> str | None:
    """The commit checked out at `directory` ("-dirty" appended when tracked files changed), or None."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
