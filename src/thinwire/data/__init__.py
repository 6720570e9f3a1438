"""Build a federation from the data config: per-client training examples and held-out splits."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from thinwire.config import Config
from thinwire.data import partition
from thinwire.data.readers import read_examples
from thinwire.errors import UsageError
from thinwire.seeding import derive_seed


@dataclass
class Federation:
    clients: list[list[dict]]
    eval: list[dict]
    heldout: list[dict] = field(default_factory=list)

    def eval_splits(self) -> dict[str, list[dict]]:
        """Evaluation splits by metric prefix: '' for the training tasks, 'heldout_' for unseen tasks."""
        return {"": self.eval, "heldout_": self.heldout} if self.heldout else {"": self.eval}


def build_federation(config: Config) -> Federation:
    data = config.data
    if data.source == "tasks":
        train, held_out, heldout_tasks = _from_suite(config)
    else:
        train, held_out, heldout_tasks = _from_source(config)
    parts = _skew(config, _partition(config, train))
    clients = [[train[i] for i in part] for part in parts]
    empty = [c for c, part in enumerate(clients) if not part]
    if empty:
        raise UsageError(f"client {empty[0]} received no examples under data.partition = "
                         f"{data.partition!r}; add data or lower federation.clients")
    return Federation(clients=clients, eval=held_out, heldout=heldout_tasks)


def _from_suite(config: Config) -> tuple[list[dict], list[dict], list[dict]]:
    from thinwire.data.tasks import FAMILIES, generate_suite

    data, fed = config.data, config.federation
    for name in [*data.tasks, *data.heldout_tasks]:
        if name not in FAMILIES:
            raise UsageError(f"unknown task family {name!r} in data.tasks/heldout_tasks; run `thinwire tasks`")
    families = [f for f in (data.tasks or FAMILIES) if f not in data.heldout_tasks]
    if not families:
        raise UsageError("data.heldout_tasks leaves no task to train on; hold out fewer tasks")
    per_family = -(-data.examples_per_client * fed.clients // len(families))
    train = generate_suite(per_family, derive_seed(fed.seed, "train-data"), families)
    eval_rows = _unseen(train, families, data.eval_examples, derive_seed(fed.seed, "eval-data"))
    heldout = []
    if data.heldout_tasks:
        heldout = _unseen([], list(data.heldout_tasks), data.eval_examples, derive_seed(fed.seed, "heldout-data"))
    if data.eval_split == "validation":  # fresh inputs, none a client trains on or the test split holds
        eval_rows = _unseen(train + eval_rows, families, data.eval_examples, derive_seed(fed.seed, "validation-data"))
        if data.heldout_tasks:
            heldout = _unseen(heldout, list(data.heldout_tasks), data.eval_examples,
                              derive_seed(fed.seed, "heldout-validation-data"))
    return train, eval_rows, heldout


def _unseen(train: list[dict], families: list[str], count: int, seed: int) -> list[dict]:
    """`count` fresh examples interleaved over `families`, none of whose inputs a client trains on."""
    from thinwire.data.tasks import generate_suite

    seen = {(e["task"], e["input"]) for e in train}
    per_family = -(-count // len(families))
    by_family: dict[str, list[dict]] = {f: [] for f in families}
    for e in generate_suite(4 * per_family, seed, families):
        if (e["task"], e["input"]) not in seen and len(by_family[e["task"]]) < per_family:
            by_family[e["task"]].append(e)
    rows = [by_family[f][i] for i in range(per_family) for f in families if i < len(by_family[f])]
    return rows[:count]


def _from_source(config: Config) -> tuple[list[dict], list[dict], list[dict]]:
    data, fed = config.data, config.federation
    fields = {"instruction": data.instruction_field, "input": data.input_field,
              "output": data.output_field, "category": data.category_field}
    examples = read_examples(data.source, data.format, fields)
    heldout = [e for e in examples if e["task"] in data.heldout_tasks]
    examples = [e for e in examples if e["task"] not in data.heldout_tasks]
    order = np.random.default_rng(derive_seed(fed.seed, "data-split")).permutation(len(examples))
    n_eval = min(data.eval_examples, len(examples) // 5)
    if n_eval < 1 or len(examples) - n_eval < fed.clients:
        raise UsageError(f"data source {data.source} has {len(examples)} usable records: too few for "
                         f"{fed.clients} clients and a held-out split; add records or lower federation.clients")
    test, train = order[:n_eval], order[n_eval:]
    if data.eval_split == "validation":
        # the test split stays out; validation comes off the training records (training loses them)
        if len(train) - n_eval < fed.clients:
            raise UsageError(f"data source {data.source} has too few records for a validation split beside "
                             f"the test split; add records or use data.eval_split = 'test'")
        test, train, heldout = train[:n_eval], train[n_eval:], []  # held-out records are all test
    return [examples[i] for i in train], [examples[i] for i in test], heldout


def _partition(config: Config, train: list[dict]) -> list[list[int]]:
    data, fed = config.data, config.federation
    rng = np.random.default_rng(derive_seed(fed.seed, "partition"))
    if data.partition == "iid":
        return partition.iid(len(train), fed.clients, rng)
    if data.partition == "by-task":
        tasks = [e["task"] for e in train]
        unlabelled = tasks.count("")
        if unlabelled:  # else they would all land in one '' task: an IID-like split, silently
            raise UsageError(f"data.partition = 'by-task' needs a task per record, but {unlabelled} of {len(tasks)} "
                             f"training records have neither a 'task' field nor data.category_field = "
                             f"{data.category_field!r}; name the field that holds each record's category, or use "
                             "data.partition = 'iid'")
        return partition.by_task(tasks, fed.clients)
    key = data.category_field if data.source == "tasks" else "category"  # a file's field was read into 'category'
    labels = [str(e.get(key, "")) for e in train]
    if all(label == "" for label in labels):
        raise UsageError(f"data.category_field = {data.category_field!r} is missing from every example; "
                         "name a field the data has")
    return partition.dirichlet(labels, fed.clients, data.dirichlet_alpha, rng)


def _skew(config: Config, parts: list[list[int]]) -> list[list[int]]:
    sigma = config.data.quantity_skew
    if sigma == 0:
        return parts
    rng = np.random.default_rng(derive_seed(config.federation.seed, "quantity-skew"))
    return partition.quantity_skew(parts, sigma, rng)
