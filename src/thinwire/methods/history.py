"""Shared machinery for methods whose downlink is a compact per-round update, never weights
(Ferret: aggregated coordinates; FedKSeed: per-seed scalars).

The global model at version v is the public pretrained weights with the updates of rounds
1..v applied in order by `apply_update`, the one function both sides call. The server keeps
every round's update; a client downloads the updates of the rounds it has not applied yet
(catch-up), so its downlink grows with the rounds it missed, and every byte of it is counted.

In one process, simulated clients share one replica: it always sits at the newest version any
client reached, and a client at an older version only needs the suffix of its own download
that the replica lacks. Because `apply_update` is deterministic and applied round by round in
the same order, the shared replica is bit-identical to what each client would rebuild alone
(tests/test_history.py checks this against private replicas).
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from thinwire.methods.base import ClientSide, ClientState, Reply, ServerSide, load_into, snapshot
from thinwire.wire import Payload, PayloadError

_SEP = "/"


def nest(updates: dict[int, Payload]) -> Payload:
    """Many versions' updates in one payload: tensor names become 'v<version>/<name>'."""
    tensors = {f"v{v}{_SEP}{name}": t for v, p in updates.items() for name, t in p.tensors.items()}
    scalars = {f"v{v}{_SEP}{name}": s for v, p in updates.items() for name, s in p.scalars.items()}
    return Payload(tensors=tensors, scalars=scalars)


def unnest(payload: Payload, version: int) -> Payload:
    prefix = f"v{version}{_SEP}"
    return Payload(
        tensors={k[len(prefix):]: t for k, t in payload.tensors.items() if k.startswith(prefix)},
        scalars={k[len(prefix):]: s for k, s in payload.scalars.items() if k.startswith(prefix)},
    )


class UpdateRule:
    """How one round's compact update changes the weights; identical on server and clients."""

    lora = False

    @abstractmethod
    def apply_update(self, weights: dict[str, torch.Tensor], update: Payload, version: int) -> None:
        """Apply round `version`'s update to `weights` in place, deterministically."""


class HistoryServer(UpdateRule, ServerSide):
    def setup(self) -> None:
        _, params = self.ctx.workbench.trainable(self.lora)
        self.weights = snapshot(params)
        self.history: list[Payload] = []
        self.synced: dict[int, int] = {}

    @property
    def version(self) -> int:
        return len(self.history)

    def download(self, rnd: int, client_id: int) -> Payload:
        since = self.synced.get(client_id, 0)
        missed = {v: self.history[v - 1] for v in range(since + 1, self.version + 1)}
        payload = nest(missed)
        payload.scalars.update({"since": since, "version": self.version})
        return payload

    def aggregate(self, rnd: int, replies: list[Reply]) -> dict[str, float]:
        for reply in replies:
            self.synced[reply.client_id] = int(reply.payload.scalars.get("version", 0))
        update, metrics = self.combine(rnd, replies)
        self.history.append(update)
        self.apply_update(self.weights, update, self.version)
        return metrics

    @abstractmethod
    def combine(self, rnd: int, replies: list[Reply]) -> tuple[Payload, dict[str, float]]:
        """The round's compact global update from the clients' uploads."""

    def eval_model(self) -> torch.nn.Module:
        model, params = self.ctx.workbench.trainable(self.lora)
        load_into(params, self.weights)
        return model

    def final_state(self) -> Payload:
        return Payload(tensors=self.weights)

    def trainable_parameters(self) -> int:
        return sum(t.numel() for t in self.weights.values())


class ReplicaClient(UpdateRule, ClientSide):
    """A client that rebuilds the global model from downloaded updates (catch-up included)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self._replica: dict[str, torch.Tensor] | None = None
        self._replica_version = 0

    def sync(self, download: Payload, state: ClientState) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
        """Bring the replica to the download's version; load it into the model for training."""
        model, params = self.ctx.workbench.trainable(self.lora)
        if self._replica is None:
            self._replica = snapshot(params)
        since, target = int(download.scalars["since"]), int(download.scalars["version"])
        if since > self._replica_version or target < self._replica_version:
            raise PayloadError(f"download covers versions ({since}, {target}] but the replica is at "
                               f"version {self._replica_version}")
        for version in range(self._replica_version + 1, target + 1):
            self.apply_update(self._replica, unnest(download, version), version)
        self._replica_version = target
        state.scalars["version"] = target
        load_into(params, self._replica)
        return model, params

    def fit(self, rnd: int, client_id: int, download: Payload, examples: list[dict], state: ClientState):
        model, params = self.sync(download, state)
        upload = self.train_and_encode(model, params, rnd, client_id, examples)
        upload.payload.scalars["version"] = self._replica_version
        return upload

    @abstractmethod
    def train_and_encode(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter], rnd: int,
                         client_id: int, examples: list[dict]):
        """Local work from the synced model; returns the `Upload`."""
