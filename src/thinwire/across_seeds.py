"""Runs of one setting over several seeds -> mean ± sample standard deviation (ALGORITHMS.md §6).

Two runs are the same setting when their resolved configs (`config.toml`) are equal in every key
but `federation.seed`. One seed of a short federated run is noisy (the clients sampled in the last
round can move exact match by several points), so a claim about a method is made on the group.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


def group_rows(groups: list[SeedGroup], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per group: seeds, and mean/std of each metric's final value and change from the base
    model, and of the up+down bytes per client-round (runs lacking a metric are left out of it)."""
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
        traffic = [float(r.summary["uplink_bytes_per_client_round"] + r.summary["downlink_bytes_per_client_round"])
                   for r in group.runs]
        row["bytes_per_client_round_mean"] = mean_std(traffic)[0]
        rows.append(row)
    return rows


def format_mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"
