"""Build a federation from the data config: per-client training examples and a held-out split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from thinwire.config import Config
from thinwire.data import partition
from thinwire.data.readers import read_alpaca
from thinwire.errors import UsageError
from thinwire.seeding import derive_seed


@dataclass
class Federation:
    clients: list[list[dict]]
    eval: list[dict]


def build_federation(config: Config) -> Federation:
    data, fed = config.data, config.federation
    if data.source == "tasks":
        train, held_out = _from_suite(config)
    else:
        examples = read_alpaca(data.source)
        order = np.random.default_rng(derive_seed(fed.seed, "data-split")).permutation(len(examples))
        n_eval = min(data.eval_examples, len(examples) // 5)
        if n_eval < 1 or len(examples) - n_eval < fed.clients:
            raise UsageError(f"data file {data.source} has {len(examples)} records: too few for "
                             f"{fed.clients} clients and a held-out split; add records or clients")
        held_out = [examples[i] for i in order[:n_eval]]
        train = [examples[i] for i in order[n_eval:]]
    parts = _partition(config, train)
    clients = [[train[i] for i in part] for part in parts]
    empty = [c for c, part in enumerate(clients) if not part]
    if empty:
        raise UsageError(f"client {empty[0]} received no examples under data.partition = "
                         f"{data.partition!r}; add data or lower federation.clients")
    return Federation(clients=clients, eval=held_out)


def _from_suite(config: Config) -> tuple[list[dict], list[dict]]:
    from thinwire.data.tasks import FAMILIES, generate_suite

    data, fed = config.data, config.federation
    families = list(data.tasks) or list(FAMILIES)
    per_family = -(-data.examples_per_client * fed.clients // len(families))
    train = generate_suite(per_family, derive_seed(fed.seed, "train-data"), families)
    seen = {(e["task"], e["input"]) for e in train}
    eval_per_family = -(-data.eval_examples // len(families))
    candidates = generate_suite(4 * eval_per_family, derive_seed(fed.seed, "eval-data"), families)
    by_family: dict[str, list[dict]] = {f: [] for f in families}
    for e in candidates:
        if (e["task"], e["input"]) not in seen and len(by_family[e["task"]]) < eval_per_family:
            by_family[e["task"]].append(e)
    rows = [by_family[f][i] for i in range(eval_per_family) for f in families if i < len(by_family[f])]
    return train, rows[: data.eval_examples]


def _partition(config: Config, train: list[dict]) -> list[list[int]]:
    data, fed = config.data, config.federation
    rng = np.random.default_rng(derive_seed(fed.seed, "partition"))
    if data.partition == "iid":
        return partition.iid(len(train), fed.clients, rng)
    if data.partition == "by-task":
        return partition.by_task([e["task"] for e in train], fed.clients)
    labels = [str(e.get(data.category_field, "")) for e in train]
    if all(label == "" for label in labels):
        raise UsageError(f"data.category_field = {data.category_field!r} is missing from every example; "
                         "name a field the data has")
    return partition.dirichlet(labels, fed.clients, data.dirichlet_alpha, rng)
