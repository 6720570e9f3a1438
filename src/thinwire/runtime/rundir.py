"""The run directory: `config.toml`, `metrics.jsonl`, `summary.json`, `final_state.safetensors`,
`predictions.jsonl` (the final evaluation, one record per example: reference, prediction, scores)
and whatever artifacts the method writes (a FedPT proxy to generate from, a CG-FedLLM autoencoder).

A run writes into `<out>.partial` and renames it to `<out>` only when it finishes, so a
directory named `<out>` is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinwire.config import Config, to_toml
from thinwire.errors import UsageError

if TYPE_CHECKING:
    from thinwire.methods.base import ServerSide

PREDICTIONS_FILE = "predictions.jsonl"
RUN_KEY_FILE = "run-key"


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


class RunDir:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")

    def open(self, config: Config) -> None:
        if self.out.exists():
            raise UsageError(f"output directory {self.out} already exists; pass a new --out or remove it")
        if self.partial.exists():
            raise UsageError(f"an interrupted run is in {self.partial}; continue it with `thinwire run --resume "
                             f"{self.out}`, or start over with --force (deletes it)")
        try:
            self.partial.mkdir(parents=True)
        except OSError as exc:
            raise UsageError(f"cannot create output directory {self.partial}: {exc.strerror}; "
                             "pass a writable --out") from exc
        atomic_write(self.partial / "config.toml", to_toml(config))
        self._metrics = (self.partial / "metrics.jsonl").open("w")

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
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
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
        os.replace(self.partial, self.out)
        return self.out

    def abandon(self) -> None:
        """Leave `<out>.partial` for inspection; close what is open."""
        metrics = getattr(self, "_metrics", None)
        if metrics is not None and not metrics.closed:
            metrics.close()
