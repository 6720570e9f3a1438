"""Shared machinery for methods whose downlink is a compact per-round update, never weights
(Ferret: aggregated coordinates; FedKSeed: per-seed scalars).

The global model at version v is the public pretrained weights with the updates of rounds
1..v applied in order by `apply_update`, the one function both sides call. The server keeps
every round's update; a client downloads the updates of the rounds it has not applied yet
(catch-up), so its downlink grows with the rounds it missed, and every byte of it is counted.

A method may merge a long catch-up into something more compact (`catch_up`; FedKSeed sends the
K accumulated per-seed sums, the paper's bound, once the per-round lists would be larger). A
replica then keeps a small record per version it reaches (`UpdateRule.hold`: FedKSeed's
accumulated sums), so that it can apply a merged download even when it is already past the
client's version. A merged catch-up lands on the server's model up to float32 rounding, not bit
for bit: one sum is applied where the server applied several.

In one process, simulated clients share one replica: it always sits at the newest version any
client reached, and a client at an older version only needs the suffix of its own download
that the replica lacks. Because `apply_update` is deterministic and applied round by round in
the same order, the shared replica is bit-identical to what each client would rebuild alone
(tests/test_history.py checks this against private replicas).

Where a client process does not outlive one message (Flower deployment starts the ClientApp
afresh per message), the runtime sets `ReplicaClient.replica_dir`, one directory per run on that
machine. The replica is then also kept there as `v<version>.safetensors` (written to a temporary
name and renamed, so readers never see a partial file; older versions are removed). A process
whose in-memory replica is missing or older than the download's `since` resumes from the newest
file: every file holds the global model at its version (the same bytes whichever client wrote
it, because the update rule is deterministic), no file is newer than the server's current
version, and the newest is at least the version any client of this machine last synced, so the
download still covers every version after the replica's.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from abc import abstractmethod
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from thinwire.errors import UsageError
from thinwire.methods import validate
from thinwire.methods.base import ClientSide, ClientState, Reply, WeightsServer, check_tensors, load_into, snapshot
from thinwire.wire import Payload, PayloadError

_SEP = "/"
_HELD = "held/"  # prefix of the replica's records (`UpdateRule.hold`) in a stored replica


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

    # A method whose `catch_up` may merge rounds sets this and implements the three methods below:
    # a replica then holds, at every version it reaches, a small record (`hold`) from which a
    # merged download can be applied even when the replica is already past the client's version.
    merges_catch_up = False

    def is_merged(self, download: Payload) -> bool:
        return False

    def hold(self, held: Payload | None, update: Payload) -> Payload:
        """The record after applying `update` on top of the record `held` (None: the base model)."""
        raise NotImplementedError

    def apply_merged(self, weights: dict[str, torch.Tensor], download: Payload, held_since: Payload | None,
                     held_now: Payload | None) -> Payload:
        """Apply a merged download (from the client's version, whose record is `held_since`) to
        `weights`, which sit at the version recorded by `held_now`; returns the target's record."""
        raise NotImplementedError


class HistoryServer(UpdateRule, WeightsServer):
    needs_shared_draws = True
    server_step_key = ""  # the method's own option for the size of the server's step

    def setup(self) -> None:
        method = self.config.method
        if method.server_optimizer != "none":
            raise UsageError(f"method.server_optimizer = {method.server_optimizer!r} does not apply to {method.name}: "
                             "its clients replay the server's per-round updates, which no server optimizer "
                             "shapes; set method.server_optimizer = 'none'")
        if method.server_lr != 1.0:
            raise UsageError(f"method.server_lr is the server optimizer's step, which {method.name} does not use; "
                             f"set {self.server_step_key} instead")
        _, params = self.ctx.workbench.trainable(self.lora)
        self.weights = snapshot(params)
        self.history: list[Payload] = []
        self.synced: dict[int, int] = {}

    @property
    def version(self) -> int:
        return len(self.history)

    def download(self, rnd: int, client_id: int) -> Payload:
        since = self.synced.get(client_id, 0)
        payload = self.catch_up(since)
        payload.scalars.update({"since": since, "version": self.version})
        return payload

    def catch_up(self, since: int) -> Payload:
        """What a client at version `since` needs to reach the current version: by default every
        missed round's update, nested by version (a method may send something more compact)."""
        return nest({v: self.history[v - 1] for v in range(since + 1, self.version + 1)})

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

    def check_update(self, reply: Reply) -> None:
        """A client must have trained from the current version (what this round's download reached)."""
        validate.int_scalar(reply.payload.scalars, "version", self.version)

    # -- checkpointing: weights, every round's update, who synced when (subclasses add theirs) --

    def state_dict(self) -> Payload | None:
        if not hasattr(self, "weights"):
            return None
        state = nest(dict(enumerate(self.history, start=1)))
        state.tensors.update({f"w/{k}": t for k, t in self.weights.items()})
        state.scalars.update({f"synced/{cid}": v for cid, v in self.synced.items()})
        state.scalars["history_len"] = len(self.history)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Payload) -> None:
        saved = {k[2:]: t for k, t in state.tensors.items() if k.startswith("w/")}
        check_tensors(saved, self.weights)
        for name, weight in self.weights.items():
            weight.copy_(saved[name])
        self.history = [unnest(state, v) for v in range(1, int(state.scalars["history_len"]) + 1)]
        self.synced = {int(k.split("/", 1)[1]): int(v) for k, v in state.scalars.items() if k.startswith("synced/")}


class ReplicaClient(UpdateRule, ClientSide):
    """A client that rebuilds the global model from downloaded updates (catch-up included)."""

    # Set by a runtime whose client processes may not outlive one message (see the module doc).
    replica_dir: Path | None = None

    def __init__(self, ctx):
        super().__init__(ctx)
        self._replica: dict[str, torch.Tensor] | None = None
        self._replica_version = 0
        # version -> the rule's record at that version (`UpdateRule.hold`; methods that merge only)
        self._held: dict[int, Payload] = {}

    def sync(self, download: Payload, state: ClientState) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
        """Bring the replica to the download's version; load it into the model for training."""
        model, params = self.ctx.workbench.trainable(self.lora)
        since, target = int(download.scalars["since"]), int(download.scalars["version"])
        if self._replica is None or self._replica_version < since:
            self._resume_from_disk(params, since, target)
        if self._replica is None:
            self._replica = snapshot(params)
        if since > self._replica_version or target < self._replica_version:
            raise PayloadError(f"download covers versions ({since}, {target}] but the replica is at "
                               f"version {self._replica_version}")
        try:
            if self.is_merged(download):
                missing = [v for v in (since, self._replica_version) if v and v not in self._held]
                if missing:
                    raise PayloadError(f"a merged catch-up from version {since} needs this replica's record "
                                       f"of version {missing[0]}, which it does not hold")
                self._held[target] = self.apply_merged(self._replica, download, self._held.get(since),
                                                       self._held.get(self._replica_version))
                self._replica_version = target
            for version in range(self._replica_version + 1, target + 1):
                update = unnest(download, version)
                self.apply_update(self._replica, update, version)
                if self.merges_catch_up:
                    self._held[version] = self.hold(self._held.get(version - 1), update)
                self._replica_version = version
        except BaseException:
            # An update that failed half-way leaves the replica at no version at all: drop it
            # rather than let a later client build on it (it is rebuilt from disk or refused).
            self._replica, self._replica_version = None, 0
            raise
        self._replica_version = target
        state.scalars["version"] = target
        self._keep_on_disk()
        load_into(params, self._replica)
        return model, params

    # -- disk-backed replica (only when a runtime sets `replica_dir`) --------------------------

    def _disk_versions(self) -> list[int]:
        if self.replica_dir is None or not self.replica_dir.is_dir():
            return []
        found = (re.fullmatch(r"v(\d+)\.safetensors", p.name) for p in self.replica_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _resume_from_disk(self, params: dict[str, torch.nn.Parameter], since: int, target: int) -> None:
        """Adopt the newest stored replica in [since, target], if any (it may vanish under a writer)."""
        for _ in range(3):
            usable = [v for v in self._disk_versions() if since <= v <= target]
            if not usable or (self._replica is not None and usable[-1] <= self._replica_version):
                return
            path = self.replica_dir / f"v{usable[-1]}.safetensors"
            try:
                with safe_open(str(path), framework="pt") as f:  # memory-mapped; each tensor copied once
                    metadata = f.metadata() or {}
                    stored = int(metadata.get("version", -1))
                    tensors = {name: f.get_tensor(name) for name in f.keys()}
            except FileNotFoundError:
                continue  # replaced by a newer version between listing and opening
            if stored != usable[-1]:
                raise PayloadError(f"stored replica {path} claims version {stored}")
            self._restore(params, tensors, json.loads(metadata.get("held", "{}")), stored)
            return

    def _keep_on_disk(self) -> None:
        """Store the replica at its version when it is newer than every stored one; drop older ones."""
        if self.replica_dir is None or self._replica_version == 0:  # version 0 is the public base model
            return
        versions = self._disk_versions()
        if versions and versions[-1] >= self._replica_version:
            return
        self.replica_dir.mkdir(parents=True, exist_ok=True)
        final = self.replica_dir / f"v{self._replica_version}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=self.replica_dir, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            state = self.state_dict()
            save_file({k: t.detach().cpu().contiguous() for k, t in state.tensors.items()}, tmp,
                      metadata={"version": str(self._replica_version),
                                "held": json.dumps({k: v for k, v in state.scalars.items() if k != "version"})})
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for version in versions:
            (self.replica_dir / f"v{version}.safetensors").unlink(missing_ok=True)

    def state_dict(self) -> Payload | None:
        """The shared replica, its version and its records (a checkpoint restores it exactly)."""
        if self._replica is None:
            return Payload(scalars={"version": 0})
        held = nest(self._held)
        return Payload(tensors={**self._replica, **{_HELD + k: t for k, t in held.tensors.items()}},
                       scalars={"version": self._replica_version,
                                **{_HELD + k: v for k, v in held.scalars.items()}})

    def load_state_dict(self, state: Payload) -> None:
        version = int(state.scalars.get("version", 0))
        if version == 0 or not state.tensors:
            self._replica, self._replica_version, self._held = None, 0, {}
            return
        _, params = self.ctx.workbench.trainable(self.lora)
        self._restore(params, state.tensors, {k: v for k, v in state.scalars.items() if k != "version"}, version)

    def _restore(self, params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor],
                 held_scalars: dict[str, float], version: int) -> None:
        """Adopt a stored replica (`state_dict`'s tensors and scalars) at `version`."""
        weights = {k: t for k, t in tensors.items() if not k.startswith(_HELD)}
        check_tensors(weights, params)
        held = Payload(tensors={k[len(_HELD):]: t for k, t in tensors.items() if k.startswith(_HELD)},
                       scalars={k[len(_HELD):]: v for k, v in held_scalars.items() if k.startswith(_HELD)})
        versions = {int(k.split(_SEP, 1)[0][1:]) for k in [*held.tensors, *held.scalars]}
        self._replica = {name: weights[name].to(p.device, p.dtype) for name, p in params.items()}
        self._replica_version = version
        self._held = {v: unnest(held, v) for v in sorted(versions)}

    def fit(self, rnd: int, client_id: int, download: Payload, examples: list[dict], state: ClientState):
        model, params = self.sync(download, state)
        upload = self.train_and_encode(model, params, rnd, client_id, examples)
        upload.payload.scalars["version"] = self._replica_version
        return upload

    @abstractmethod
    def train_and_encode(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter], rnd: int,
                         client_id: int, examples: list[dict]):
        """Local work from the synced model; returns the `Upload`."""
