"""Checkpoint and resume for the local runtime: `thinwire run --resume DIR`.

After every round the runtime writes the server's complete state into `<out>.partial/checkpoint/`:

- `server-r<k>.safetensors`: `ServerSide.state_dict()`: global weights (or a method's compact
  state), its update history, who synced when, server-optimizer moments, Ferret momentum,
  FedKSeed-Pro's seed history;
- `client-r<k>.safetensors`: `ClientSide.state_dict()`: what the simulated clients share across
  rounds (the `ReplicaClient` replica and its version), so a resumed simulation continues from
  the same bits rather than from a rebuild;
- `states-r<k>.safetensors`: every client's `ClientState`;
- `state.json`, the commit record: the round, a digest of the resolved config, the name, size
  and SHA-256 of the three files, the length and SHA-256 of `metrics.jsonl` up to this round
  (the round records are read back from it), the base and latest evaluation, the elapsed time.

Everything is safetensors + JSON (decoded through `Payload.decode`: no pickle). Each file is
written to a temporary name, flushed to disk and renamed; `state.json` is renamed last, and the
previous round's files are deleted only after it, so a kill at any instant leaves either the old
or the new checkpoint whole. Sampling, faults and local training draw from streams keyed by
(seed, round, client), so nothing else needs saving: a resumed run is bit-identical to an
uninterrupted one (weights and metrics; timings differ).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from thinwire.config import Config, to_toml
from thinwire.errors import UsageError
from thinwire.methods.base import ClientState
from thinwire.runtime.rundir import RunDir, atomic_write, json_line
from thinwire.secret import key_bytes, key_tensor
from thinwire.wire import Payload, PayloadError

FORMAT = 1
T = TypeVar("T")
DIRNAME = "checkpoint"
STATE = "state.json"
PARTIAL = ".partial"


def config_digest(config: Config) -> str:
    return hashlib.sha256(to_toml(config).encode()).hexdigest()


def _durable_write(path: Path, fill: Callable[[BinaryIO], T]) -> T:
    """`fill` writes into a temporary file, which is flushed to disk and renamed over `path`;
    returns what `fill` returned."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        result = fill(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return result


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def encode_states(states: dict[int, ClientState]) -> Payload:
    """All clients' states in one payload: names become 'c<client>/<name>'."""
    tensors = {f"c{cid}/{k}": t for cid, s in states.items() for k, t in s.tensors.items()}
    scalars = {f"c{cid}/{k}": v for cid, s in states.items() for k, v in s.scalars.items()}
    scalars["clients"] = len(states)
    return Payload(tensors=tensors, scalars=scalars)


def decode_states(payload: Payload) -> dict[int, ClientState]:
    states = {cid: ClientState() for cid in range(int(payload.scalars["clients"]))}
    for key, t in payload.tensors.items():
        cid, name = key[1:].split("/", 1)
        states[int(cid)].tensors[name] = t
    for key, v in payload.scalars.items():
        if key != "clients":
            cid, name = key[1:].split("/", 1)
            states[int(cid)].scalars[name] = v
    return states


@dataclass
class Restored:
    """A checkpoint as loaded: what the runtime needs to continue after round `round`."""

    round: int
    rounds: list[dict[str, Any]]
    base_eval: dict[str, float]
    evaluation: dict[str, float]
    elapsed_s: float
    server: Payload
    client: Payload | None
    states: dict[int, ClientState]
    secrets: dict[str, bytes]  # the server's keys (central DP's noise key): only ever in the checkpoint


class Checkpoint:
    def __init__(self, partial: Path):
        self.dir = Path(partial) / DIRNAME

    def save(self, config: Config, rnd: int, server: Payload, client: Payload | None,
             states: dict[int, ClientState], metrics: tuple[int, str], base_eval: dict[str, float],
             evaluation: dict[str, float], elapsed_s: float, secrets: dict[str, bytes] | None = None) -> None:
        """Commit round `rnd`; `metrics` is (bytes, SHA-256) of metrics.jsonl as logged so far."""
        self.dir.mkdir(parents=True, exist_ok=True)
        files = {}
        parts = {"server": server, "client": client, "states": encode_states(states),
                 "secrets": Payload(tensors={k: key_tensor(v) for k, v in (secrets or {}).items()})}
        for role, payload in parts.items():
            if payload is None:
                continue
            name = f"{role}-r{rnd}.safetensors"
            size, digest = _durable_write(self.dir / name, payload.write)  # streamed: never whole in memory
            files[role] = {"name": name, "bytes": size, "sha256": digest}
        record = {"format": FORMAT, "round": rnd, "method": config.method.name, "config_sha256": config_digest(config),
                  "files": files, "metrics_bytes": metrics[0], "metrics_sha256": metrics[1],
                  "base_eval": base_eval, "evaluation": evaluation,
                  "elapsed_s": elapsed_s}
        _durable_write(self.dir / STATE, lambda handle: handle.write(json.dumps(record, sort_keys=True).encode()))
        _fsync_dir(self.dir)
        keep = {f["name"] for f in files.values()} | {STATE}
        for path in self.dir.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def load(self, config: Config) -> Restored | None:
        """The committed checkpoint, or None (saying on stderr that the run restarts) when there is
        none yet; UsageError when it is unusable."""
        path = self.dir / STATE
        if not path.is_file():
            print(restart_notice(self.dir.parent), file=sys.stderr)
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
            raise UsageError(f"checkpoint {path} is unreadable ({exc}); start the run afresh") from exc
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise UsageError(f"checkpoint {path} has an unknown format; start the run afresh")
        _check_record(record, path)
        if record.get("config_sha256") != config_digest(config):
            raise UsageError(f"checkpoint {path} was written for a different config than {self.dir.parent}/config.toml; "
                             "restore that config or start the run afresh")
        loaded: dict[str, Payload | None] = {"client": None, "secrets": Payload()}
        for role, info in record["files"].items():
            file = self.dir / info["name"]
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise UsageError(f"checkpoint file {file} is missing ({exc.strerror}); start the run afresh") from exc
            if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise UsageError(f"checkpoint file {file} is corrupt (size or checksum differs); start the run afresh")
            try:
                loaded[role] = Payload.decode(data)
            except PayloadError as exc:
                raise UsageError(f"checkpoint file {file} is not a valid payload: {exc}") from exc
        if "server" not in loaded or "states" not in loaded:
            raise UsageError(f"checkpoint {path} lacks the server or client states; start the run afresh")
        metrics = self.dir.parent / "metrics.jsonl"
        try:
            with open(metrics, "rb") as handle:
                logged = handle.read(int(record["metrics_bytes"]))
        except OSError as exc:
            raise UsageError(f"{metrics} is unreadable ({exc.strerror}); start the run afresh") from exc
        if len(logged) != record["metrics_bytes"] or hashlib.sha256(logged).hexdigest() != record["metrics_sha256"]:
            raise UsageError(f"{metrics} no longer holds the rounds the checkpoint saw; start the run afresh")
        rounds = [json.loads(line) for line in logged.decode().splitlines()]
        if len(rounds) != int(record["round"]):
            raise UsageError(f"{metrics} holds {len(rounds)} rounds, the checkpoint {record['round']}; "
                             "start the run afresh")
        return Restored(int(record["round"]), rounds, record["base_eval"], record["evaluation"],
                        float(record["elapsed_s"]), loaded["server"], loaded["client"],
                        decode_states(loaded["states"]),
                        {k: key_bytes(t) for k, t in loaded["secrets"].tensors.items()})

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def committed_round(partial: Path) -> int:
    """The round whose checkpoint `partial` holds (0: none, so a resume starts from round 1)."""
    try:
        return int(json.loads((Path(partial) / DIRNAME / STATE).read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# The commit record's fields and their types; a record that lacks one was not written by `save`.
RECORD_FIELDS = {"round": int, "files": dict, "metrics_bytes": int, "metrics_sha256": str, "base_eval": dict,
                 "evaluation": dict, "elapsed_s": (int, float)}
FILE_FIELDS = {"name": str, "bytes": int, "sha256": str}


def _check_record(record: dict[str, Any], path: Path) -> None:
    """UsageError unless `record` has every field `save` writes, with its type, and names only
    files inside the checkpoint directory."""
    def need(table: dict[str, Any], key: str, kind: type | tuple[type, ...], name: str) -> None:
        value = table.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UsageError(f"checkpoint {path} lacks a valid {name!r}, so thinwire did not write it; "
                             "start the run afresh")

    for key, kind in RECORD_FIELDS.items():
        need(record, key, kind, key)
    for role, info in record["files"].items():
        need(record["files"], role, dict, f"files.{role}")
        for key, kind in FILE_FIELDS.items():
            need(info, key, kind, f"files.{role}.{key}")
        if Path(info["name"]).name != info["name"]:
            raise UsageError(f"checkpoint {path} names a file outside its directory ({info['name']!r}); "
                             "start the run afresh")
    if record["round"] < 1:
        raise UsageError(f"checkpoint {path} is at round {record['round']}; start the run afresh")


def restart_notice(partial: Path) -> str:
    """What `--resume` says of a `.partial` without a checkpoint: it starts again from round 1."""
    metrics = partial / "metrics.jsonl"
    logged = metrics.read_bytes().count(b"\n") if metrics.is_file() else 0
    again = f"; its {logged} logged round(s) run again" if logged else ""
    return (f"notice: {partial} holds no checkpoint (the run stopped before its first round ended, or ran with "
            f"federation.checkpoint = false): resuming restarts it from round 1{again}")


def resume_paths(path: str | Path) -> tuple[Path, Path]:
    """(out, partial) for `--resume PATH`, where PATH is the run's `.partial` directory or its --out."""
    path = Path(path)
    if path.name.endswith(PARTIAL) and len(path.name) > len(PARTIAL):
        out, partial = path.with_name(path.name[: -len(PARTIAL)]), path
    else:
        out, partial = path, path.with_name(path.name + PARTIAL)
    if not partial.is_dir():
        if (out / "summary.json").is_file():
            raise UsageError(f"the run in {out} already finished; nothing to resume")
        raise UsageError(f"nothing to resume at {path}: {partial} does not exist; pass the --out of an "
                         "interrupted run or its .partial directory")
    if out.exists():
        raise UsageError(f"both {out} and {partial} exist; move {out} away to resume into it")
    if not (partial / "config.toml").is_file():
        raise UsageError(f"{partial} holds no config.toml; it is not a thinwire run directory")
    return out, partial


class ResumableRunDir(RunDir):
    """A RunDir that can also re-open an interrupted run's `.partial` directory, and knows the
    length and digest of what it logged (the checkpoint's hold on metrics.jsonl)."""

    def __init__(self, out: Path):
        super().__init__(out)
        self.logged = 0
        self._bytes = 0
        self._digest = hashlib.sha256()

    def log_round(self, record: dict[str, Any]) -> None:
        super().log_round(record)
        self._count(json_line(record))
        self.logged += 1

    def _count(self, text: str) -> None:
        data = text.encode()
        self._bytes += len(data)
        self._digest.update(data)

    def metrics_mark(self) -> tuple[int, str]:
        return self._bytes, self._digest.hexdigest()

    def reopen(self, config: Config, rounds: list[dict[str, Any]]) -> None:
        """Continue in `<out>.partial`: metrics.jsonl holds exactly the checkpoint's rounds."""
        if self.out.exists():
            raise UsageError(f"output directory {self.out} already exists; move it away to resume")
        if not self.partial.is_dir():
            raise UsageError(f"nothing to resume: {self.partial} does not exist")
        atomic_write(self.partial / "config.toml", to_toml(config))
        text = "".join(json_line(r) for r in rounds)
        atomic_write(self.partial / "metrics.jsonl", text)
        self._count(text)
        for stale in ("final_state.safetensors", "summary.json"):
            (self.partial / stale).unlink(missing_ok=True)
        self._metrics = (self.partial / "metrics.jsonl").open("a")
        self.logged = len(rounds)

    def discard(self) -> None:
        """Remove `<out>.partial` entirely (bad input before any round: no partial outputs)."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self.abandon()
