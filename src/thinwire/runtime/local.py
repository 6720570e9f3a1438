"""The in-process runtime: the round engine over clients that run one after another here.

Clients share the workbench's single model, so memory does not grow with the number of
clients. Every download and upload is encoded to bytes, counted, and decoded again before the
other side sees it: the method only ever gets what crossed the wire.

A client whose local work raises, or that takes longer than `federation.round_timeout_s`, costs
only its own update; its `ClientState` is left as it was (fit works on a copy, committed only on
success). If *every* client that ran in a round raised (at least two), the first error is
re-raised: that is a bug in the method or data, not a fault. The deadline measures a client's
wall time, the one input that is not a function of the seed: with the default 600 s it never
fires on the built-in models.

The deadline holds even when `fit` never returns: each client works in a worker thread that the
round waits for until the deadline. Past it, the client is told to stop at its next training step
(it raises there), and the round waits a grace (`grace_s`: 5 to 60 s) for that; a client that
neither stops nor returns by then is abandoned, and the round moves on without it. Clients share
this process's model, so an abandoned thread that wakes later stops at its first step, but what it
does before that step can disturb the client then running: the record says "abandoned".
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from functools import partial
import weakref
from pathlib import Path
from typing import Any

import torch

from thinwire.config import Config
from thinwire.data import Federation
from thinwire.methods import get_method
from thinwire.methods.base import ClientSide, ClientState, RunContext, Upload
from thinwire.methods.validate import reason as short_reason
from thinwire import secagg
from thinwire.runtime import engine
from thinwire.runtime.checkpoint import ResumableRunDir, resume_paths
from thinwire.runtime.engine import Arrival, Transport
from thinwire.runtime.upload import client_report, client_upload, take_roster
from thinwire.wire import Payload


def run_local(config: Config, out: Path, quiet: bool = False, *, resume: bool = False) -> dict[str, Any]:
    """Run `config` into `out` (via `<out>.partial`); `resume=True` continues `<out>.partial`."""
    return engine.run(config, out, InProcess(), quiet=quiet, resume=resume)


def resume_local(path: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Continue the interrupted run at `path` (its --out, or its `.partial` directory)."""
    from thinwire.config import load_config

    out, partial = resume_paths(path)
    return run_local(load_config(partial / "config.toml"), out, quiet=quiet, resume=True)


class InProcess(Transport):
    """Every client's work, here and now, one client after another."""

    def bind(self, ctx: RunContext, federation: Federation, progress: Any, run_dir: ResumableRunDir) -> None:
        self.config, self.federation, self.progress = ctx.config, federation, progress
        self.timeout_s = ctx.config.federation.round_timeout_s
        self.client: ClientSide = get_method(ctx.config.method.name).client(ctx)
        self.states = {cid: ClientState() for cid in range(ctx.config.federation.clients)}
        self.shared = SharedTensors(self.client.shared_state_prefixes)
        self.clients_bar = progress.add_task("clients", total=ctx.config.federation.clients_per_round)
        self.steps_bar = progress.add_task("steps", total=self.client.steps_per_round())

        def on_step() -> None:
            thread = threading.current_thread()
            if isinstance(thread, ClientThread) and thread.stopped:
                raise ClientDeadline("past the round deadline")  # the round stopped waiting for this client
            progress.advance(self.steps_bar)

        ctx.on_step = on_step
        self.secagg_clients: dict[int, secagg.SecAggClient] = {}  # each client's SecAgg+ keys and round

    def control(self, rnd: int, stage: str, messages: dict[int, bytes]) -> dict[int, bytes | str]:
        replies: dict[int, bytes | str] = {}
        for cid, message in messages.items():
            if stage == "setup":  # new keys for the run (or after a lost state)
                self.secagg_clients[cid] = secagg.SecAggClient(cid)
            try:
                replies[cid] = self.secagg_clients[cid].step(stage, message)
            except Exception as exc:  # a client that cannot follow the protocol costs its own part
                replies[cid] = f"{type(exc).__name__}: {short_reason(exc)}"
        return replies

    def exchange(self, rnd: int, downloads: dict[int, bytes]) -> tuple[dict[int, Arrival], float]:
        self.progress.reset(self.clients_bar)
        arrivals: dict[int, Arrival] = {}
        errors, first_error, local_s = 0, None, 0.0
        for cid, down in downloads.items():
            self.progress.advance(self.clients_bar)
            self.progress.reset(self.steps_bar)
            state = self.shared.working_copy(self.states[cid])
            t0 = time.perf_counter()
            worker = ClientThread(partial(self._fit, rnd, cid, down, state))
            done = worker.finish(self.timeout_s, grace_s(self.timeout_s))
            took = time.perf_counter() - t0
            local_s += took
            if not done:  # never returned, nor reached a step after the deadline: the round moves on
                arrivals[cid] = Arrival(failure=f"no reply within {self.timeout_s:g} s (its work did not stop "
                                                f"within a further {grace_s(self.timeout_s):g} s: abandoned)")
                continue
            if isinstance(worker.error, ClientDeadline):
                arrivals[cid] = Arrival(failure=f"no reply within {self.timeout_s:g} s (stopped at {took:.1f} s)")
                continue
            if worker.error is not None:  # a crashing client costs its own update, not the run
                errors += 1
                first_error = first_error or worker.error
                arrivals[cid] = Arrival(failure=f"{type(worker.error).__name__}: {short_reason(worker.error)}")
                continue
            upload, up = worker.result
            if took > self.timeout_s:  # its upload arrived, too late to be used
                arrivals[cid] = Arrival(up=up, failure=f"no reply within {self.timeout_s:g} s (took {took:.1f} s)")
                continue
            self.states[cid] = self.shared.intern(state)
            num_examples, metrics = client_report(self.config, upload)
            arrivals[cid] = Arrival(up=up, num_examples=num_examples, metrics=metrics)
        if errors >= 2 and errors == len(downloads) and first_error is not None:
            raise first_error  # every client that ran crashed: a bug, not a client fault
        return arrivals, local_s

    def _fit(self, rnd: int, cid: int, down: bytes, state: ClientState) -> tuple[Upload, bytes]:
        """One client's work: its upload, and the bytes it sends."""
        download = Payload.decode(down)
        roster = take_roster(download)
        upload = self.client.fit(rnd, cid, download, self.federation.clients[cid], state)
        return upload, client_upload(self.config, rnd, cid, upload.payload, state=state,
                                     secure=self.secagg_clients.get(cid), roster=roster)

    def state(self) -> tuple[Payload | None, dict[int, ClientState]]:
        return self.client.state_dict(), self.states

    def restore(self, client: Payload | None, states: dict[int, ClientState]) -> None:
        if client is not None:
            self.client.load_state_dict(client)
        self.states = {cid: self.shared.intern(state) for cid, state in states.items()}


class ClientDeadline(Exception):
    """Raised inside a client's work at its next step once the round has stopped waiting for it."""


def grace_s(timeout_s: float) -> float:
    """How long past the deadline a round waits for a client to reach its next step and stop."""
    return min(max(timeout_s, 5.0), 60.0)


class ClientThread(threading.Thread):
    """One client's work, in a daemon thread that the round can stop waiting for.

    The round waits on an Event, not `join`: a `join` interrupted by Ctrl-C marks a running thread
    as stopped (CPython's bpo-45274 handling), after which the process exits while the work is
    still inside torch and aborts."""

    def __init__(self, work: Callable[[], tuple[Upload, bytes]]):
        super().__init__(name="thinwire-client", daemon=True)
        self.work = work
        self.result: tuple[Upload, bytes] | None = None
        self.error: BaseException | None = None
        self.stopped = False  # set past the deadline: the work's next step raises ClientDeadline
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # handed to the round, which decides what it costs
            self.error = exc
        finally:
            self.done.set()

    def finish(self, timeout_s: float, grace: float) -> bool:
        """Run the work; False when it neither returned by the deadline nor stopped within `grace`
        after it (the thread is then abandoned, and stops at its next step if it ever takes one)."""
        self.start()
        try:
            if not self.done.wait(timeout_s):
                self.stopped = True
                self.done.wait(grace)
        except KeyboardInterrupt:  # Ctrl-C: the work stops at its next step before the process exits
            self.stopped = True
            self.done.wait()
            raise
        if self.error is not None and not isinstance(self.error, Exception):
            raise self.error  # not a client fault (SystemExit and the like)
        return self.done.is_set()


class SharedTensors:
    """One copy, in this process, of the state tensors that many clients hold alike.

    Tensors under the method's `shared_state_prefixes` are never modified in place, so a client's
    working copy may share them (everything else is cloned: a failed fit must leave the state as
    it was), and equal ones are interned by content after each fit: with CG-FedLLM, 40 clients
    holding the same autoencoder keep one of it, not 40.
    """

    def __init__(self, prefixes: tuple[str, ...]):
        self.prefixes = prefixes
        self.pool: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()
        self.pooled: dict[int, weakref.ref] = {}  # id -> the pooled tensor: a state that kept it is not hashed again

    def working_copy(self, state: ClientState) -> ClientState:
        return ClientState(tensors={k: t if k.startswith(self.prefixes) else t.clone() for k, t in state.tensors.items()},
                           scalars=dict(state.scalars))

    def intern(self, state: ClientState) -> ClientState:
        for name, t in state.tensors.items():
            if not name.startswith(self.prefixes):
                continue
            known = self.pooled.get(id(t))
            if known is not None and known() is t:
                continue
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            key = (name, str(t.dtype), tuple(t.shape), str(t.device), hashlib.blake2b(data, digest_size=16).digest())
            state.tensors[name] = pooled = self.pool.setdefault(key, t)
            self.pooled[id(pooled)] = weakref.ref(pooled)
        return state
