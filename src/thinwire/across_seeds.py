"""Runs of one setting over several seeds -> mean ± sample standard deviation (ALGORITHMS.md §6).

Two runs are the same setting when their resolved configs (`config.toml`) are equal in every key
but `federation.seed`. One seed of a short federated run is noisy (the clients sampled in the last
round can move exact match by several points), so a claim about a method is made on the group.

A group's share of its reference's gain is the mean gain over its seeds against the mean gain of
the reference (tables.find_baseline: FedIT for LoRA methods, FedAvg for full-parameter ones) over
the same seeds, both measured from the reference run's base evaluation (the same model; a method
on a smaller model is measured from the large model's start, not from its own weaker base).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from thinwire.tables import find_baseline, round_times

if TYPE_CHECKING:
    from thinwire.tables import Run

SEED_KEY = "federation.seed"
_SEED_SUFFIX = re.compile(r"[-_.]?seed-?\d+$")


@dataclass
class SeedGroup:
    label: str
    runs: list[Run]

    @property
    def seeds(self) -> list[Any]:
        return [_seed(run) for run in self.runs]


def _seed(run: Run) -> Any:
    return run.config.get(SEED_KEY, run.summary.get("seed"))


def seed_groups(runs: list[Run]) -> list[SeedGroup]:
    """Runs grouped by setting, in first-seen order, one run per seed in a group (a second run of a
    seed, which differs in something the config does not record, such as the environment, starts
    another group). A run without a readable config is its own group.

    A group is labelled by its runs' directory name without a `-seed<N>` suffix when they share one,
    else by its first run's label; repeated labels get ` #2`, ` #3`.
    """
    members: dict[str, list[list[Run]]] = {}
    for run in runs:
        setting = {k: v for k, v in run.config.items() if k != SEED_KEY} if run.config else str(run.path)
        same = members.setdefault(json.dumps(setting, sort_keys=True, default=str), [])
        free = [g for g in same if _seed(run) not in {_seed(r) for r in g}]
        if free:
            free[0].append(run)
        else:
            same.append([run])
    groups, used = [], {}
    for group in (g for same in members.values() for g in same):
        names = {_SEED_SUFFIX.sub("", run.path.name) for run in group}
        label = names.pop() if len(group) > 1 and len(names) == 1 else group[0].label
        used[label] = used.get(label, 0) + 1
        groups.append(SeedGroup(label if used[label] == 1 else f"{label} #{used[label]}", group))
    return groups


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1); std is None below two values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


SHARE_METRICS = ("exact_match", "rougeL", "loss")
SHARE_HEADER = "share of reference's gain (EM / RL / loss)"


def gain(final: dict[str, Any], base: dict[str, Any], key: str) -> float | None:
    """How much `final` improves on `base` in `key` (lower is better for the loss)."""
    if final.get(key) is None or base.get(key) is None:
        return None
    return float(base[key]) - float(final[key]) if key == "loss" else float(final[key]) - float(base[key])


def group_rows(groups: list[SeedGroup], metrics: list[str], runs: list[Run]) -> list[dict[str, Any]]:
    """One row per group: seeds, and mean/std of each metric's final value and change from the base
    model; the share of its reference's gain (module docstring) over the seeds whose reference run
    is among `runs`; mean whole-run bytes each way, up+down bytes per client-round and round time
    (runs lacking a figure are left out of it)."""
    rows = []
    for group in groups:
        row: dict[str, Any] = {"run": group.label, "method": group.runs[0].method, "n": len(group.runs),
                               "seeds": " ".join(str(s) for s in group.seeds)}
        for key in metrics:
            finals, changes = [], []
            for run in group.runs:
                final, base = run.summary["final_eval"].get(key), run.summary["base_eval"].get(key)
                if final is not None:
                    finals.append(float(final))
                    if base is not None:
                        changes.append(float(final) - float(base))
            row[f"final_{key}_mean"], row[f"final_{key}_std"] = mean_std(finals)
            row[f"change_{key}_mean"], row[f"change_{key}_std"] = mean_std(changes)
        row.update(_share(group, groups, runs))
        s = [r.summary for r in group.runs]
        row["bytes_per_client_round_mean"] = mean_std([float(x["uplink_bytes_per_client_round"]
                                                             + x["downlink_bytes_per_client_round"]) for x in s])[0]
        row["uplink_bytes_total_mean"] = mean_std([float(x["uplink_bytes_total"]) for x in s])[0]
        row["downlink_bytes_total_mean"] = mean_std([float(x["downlink_bytes_total"]) for x in s])[0]
        per_run = [mean_std([float(t["total"]) for t in round_times(r) if t.get("total") is not None])[0]
                   for r in group.runs]
        row["round_s_mean"] = mean_std([t for t in per_run if t is not None])[0]
        rows.append(row)
    return rows


def _share(group: SeedGroup, groups: list[SeedGroup], runs: list[Run]) -> dict[str, Any]:
    """`share_<metric>`: Σ gain / Σ reference gain over the seeds the group shares with its reference
    setting. The reference is one setting for every seed: the group of the baseline run that
    `find_baseline` gives its runs, the plainly named one (`fedavg-seed0`, not a variant) first."""
    found = [ref for ref, _ in (find_baseline(run, runs) for run in group.runs) if ref is not None]
    plain = [ref for ref in found if ref.path.name in (ref.method, f"{ref.method}-seed{_seed(ref)}")]
    reference = next((g for ref in plain + found for g in groups if ref in g.runs), None)
    if reference is None:
        return {"reference": None, "reference_seeds": 0}
    by_seed = {_seed(ref): ref for ref in reference.runs}
    pairs = [(run, by_seed[_seed(run)]) for run in group.runs if _seed(run) in by_seed]
    if not pairs:
        return {"reference": None, "reference_seeds": 0}
    shares: dict[str, Any] = {"reference": reference.label, "reference_seeds": len(pairs)}
    for key in SHARE_METRICS:
        mine = [gain(run.summary["final_eval"], ref.summary["base_eval"], key) for run, ref in pairs]
        theirs = [gain(ref.summary["final_eval"], ref.summary["base_eval"], key) for _, ref in pairs]
        if None in mine or None in theirs or not sum(theirs):
            continue
        shares[f"share_{key}"] = sum(mine) / sum(theirs)
    return shares


def format_mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_share(row: dict[str, Any]) -> str:
    """`98% / 97% / 95% of fedavg-sgd (3 seeds)`: a group row's share of its reference's gain."""
    if row.get("reference") is None:
        return "-"
    shares = [row.get(f"share_{k}") for k in SHARE_METRICS]
    return (" / ".join("-" if v is None else f"{100 * v:.0f}%" for v in shares)
            + f" of {row['reference']} ({row['reference_seeds']} seed{'s' if row['reference_seeds'] != 1 else ''})")
