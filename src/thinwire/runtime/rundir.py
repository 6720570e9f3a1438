"""The run directory: `config.toml`, `metrics.jsonl`, `summary.json`, `final_state.safetensors`,
`predictions.jsonl` (the final evaluation, one record per example: reference, prediction, scores)
and whatever artifacts the method writes (a FedPT proxy to generate from, a CG-FedLLM autoencoder).

A run writes into `<out>.partial` and renames it to `<out>` only when it finishes, so a
directory named `<out>` is always complete. The process writing it holds the lock of
`<out>.partial/lock` until then, so a second process on the same output (the same command twice,
a compare beside a resume) stops with a clear error instead of writing into the first one's files.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import math
import os
import resource
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from thinwire.config import Config, to_toml
from thinwire.errors import UsageError

if TYPE_CHECKING:
    from thinwire.methods.base import ServerSide

PREDICTIONS_FILE = "predictions.jsonl"
RUN_KEY_FILE = "run-key"
LOCK_FILE = "lock"


def atomic_write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def peak_rss_mb() -> float:
    """The process's resident-memory high-water mark (VmHWM, which `reset_peak_rss` can reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hold(partial: Path) -> TextIO:
    """Take the writer's lock of a run's `.partial` directory; the kernel releases it when the
    process ends, however it ends, so a killed run never leaves a stale lock."""
    handle = (partial / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise UsageError(f"another thinwire process (pid {pid}) is writing {partial}; wait for it to end, "
                         "or pass another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def ensure_not_written(partial: Path) -> None:
    """A UsageError when another process is writing `partial` (before deleting or reusing it)."""
    if partial.is_dir():
        hold(partial).close()


def being_written(partial: Path) -> bool:
    try:
        ensure_not_written(partial)
    except UsageError:
        return True
    return False


def resume_command(out: Path, runtime: str = "local") -> str:
    """The exact command that continues the interrupted run of `out` (copy-paste safe)."""
    return f"thinwire run --resume {shlex.quote(str(out))}" + ("" if runtime == "local" else f" --runtime {runtime}")


def rounds_logged(partial: Path) -> int:
    """How many round records an interrupted run's metrics.jsonl holds."""
    try:
        return sum(1 for line in (partial / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def interrupted_runs(parent: Path, prefix: str, config: Config) -> list[Path]:
    """`<prefix>-*.partial` directories under `parent` holding an interrupted run of exactly `config`
    (their config.toml is its resolved TOML) that no process is writing and that can be resumed
    (no finished `<out>` beside them), newest first."""
    text = to_toml(config)
    found = []
    for partial in Path(parent).glob(f"{glob.escape(prefix)}-*.partial"):
        try:
            same = (partial / "config.toml").read_text() == text
        except OSError:
            continue
        if same and not partial.with_name(partial.name[: -len(".partial")]).exists() and not being_written(partial):
            found.append(partial)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


class RunDir:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self._lock: TextIO | None = None

    def open(self, config: Config) -> None:
        if self.out.exists():
            raise UsageError(f"output directory {self.out} already exists; pass a new --out or remove it")
        if self.partial.exists():
            ensure_not_written(self.partial)
            raise UsageError(f"an interrupted run is in {self.partial}; continue it with `{resume_command(self.out)}`, "
                             "or start over with --force (deletes it)")
        try:
            self.partial.mkdir(parents=True)
        except OSError as exc:
            raise UsageError(f"cannot create output directory {self.partial}: {exc.strerror}; "
                             "pass a writable --out") from exc
        self.hold()
        atomic_write(self.partial / "config.toml", to_toml(config))
        self._metrics = (self.partial / "metrics.jsonl").open("w")

    def hold(self) -> None:
        """Hold the writer's lock of `<out>.partial` (an interrupted run's, before resuming it)."""
        if self._lock is None and self.partial.is_dir():
            self._lock = hold(self.partial)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @property
    def run_key(self) -> str:
        """This run's identity, kept across resumes: what remote clients key their stored state by
        (Flower's run id changes when a ServerApp is started again)."""
        path = self.partial / RUN_KEY_FILE
        if not path.is_file():
            text = f"{self.partial.resolve()}|{time.time_ns()}|{(self.partial / 'config.toml').read_text()}"
            atomic_write(path, hashlib.sha256(text.encode()).hexdigest()[:20])
        return path.read_text().strip()

    def log_round(self, record: dict[str, Any]) -> None:
        self._metrics.write(json_line(record))
        self._metrics.flush()

    def save_predictions(self, records: list[dict[str, Any]]) -> None:
        """The latest evaluation's per-example records (the final one survives into `<out>`)."""
        atomic_write(self.partial / PREDICTIONS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def finish(self, summary: dict[str, Any], server: ServerSide) -> Path:
        """Write the server's final state, its artifacts and the summary; then publish `<out>`."""
        self._metrics.close()
        summary["artifacts"] = server.save_artifacts(self.partial)
        atomic_write(self.partial / "final_state.safetensors", server.final_state().encode())
        atomic_write(self.partial / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        (self.partial / LOCK_FILE).unlink(missing_ok=True)
        os.replace(self.partial, self.out)
        self.release()
        return self.out

    def abandon(self) -> None:
        """Leave `<out>.partial` for inspection; close what is open."""
        metrics = getattr(self, "_metrics", None)
        if metrics is not None and not metrics.closed:
            metrics.close()
        self.release()


def finite(value: Any) -> Any:
    """`value` with every NaN or ±Inf float (in nested dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    """One line of metrics.jsonl: strict JSON (no NaN or Infinity, which JSON does not have)."""
    return json.dumps(finite(record), sort_keys=True, allow_nan=False) + "\n"
