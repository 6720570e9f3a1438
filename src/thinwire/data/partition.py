"""Seeded federated partitions: which example indices each client holds."""

from __future__ import annotations

import numpy as np

from thinwire.errors import UsageError


def iid(n_examples: int, clients: int, rng: np.random.Generator) -> list[list[int]]:
    order = rng.permutation(n_examples)
    return [sorted(part.tolist()) for part in np.array_split(order, clients)]


def dirichlet(labels: list[str], clients: int, alpha: float, rng: np.random.Generator,
              attempts: int = 100) -> list[list[int]]:
    """Per label, split its examples over clients with proportions ~ Dir(alpha); no client empty."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    for _ in range(attempts):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in sorted(groups):
            members = rng.permutation(groups[label])
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if all(parts):
            return [sorted(p) for p in parts]
    raise UsageError(f"dirichlet partition left a client empty after {attempts} draws; "
                     "raise data.dirichlet_alpha, add examples or lower federation.clients")


def by_task(tasks: list[str], clients: int) -> list[list[int]]:
    """Each client holds one task (round-robin over sorted task names); clients sharing a task split it.
    Fewer clients than tasks is an error: the unheld tasks would drop out of training silently."""
    names = sorted(set(tasks))
    if clients < len(names):
        raise UsageError(f"data.partition = 'by-task' gives each client one task family, but {clients} clients "
                         f"cannot hold {len(names)} families ({', '.join(names[clients:])} would go untrained); "
                         "add clients or list fewer data.tasks")
    holders: dict[str, list[int]] = {name: [] for name in names}
    for client in range(clients):
        holders[names[client % len(names)]].append(client)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for name, owners in holders.items():
        if not owners:
            continue
        members = [i for i, t in enumerate(tasks) if t == name]
        for k, chunk in enumerate(np.array_split(np.array(members, dtype=int), len(owners))):
            parts[owners[k]].extend(chunk.tolist())
    return parts


def quantity_skew(parts: list[list[int]], sigma: float, rng: np.random.Generator) -> list[list[int]]:
    """Keep a lognormal(0, sigma) share of each client's examples (the largest keeps all, each keeps one)."""
    weights = rng.lognormal(0.0, sigma, size=len(parts))
    weights /= weights.max()
    kept = []
    for part, w in zip(parts, weights):
        n = max(1, int(np.ceil(len(part) * w)))
        kept.append(sorted(rng.permutation(part)[:n].tolist()) if part else [])
    return kept
