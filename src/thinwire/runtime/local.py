"""The in-process runtime: a whole federated run, read top to bottom.

Clients run one after another over the workbench's single model, so memory does not grow with
the number of clients. Every download and upload is encoded to bytes, counted, and decoded
again before the other side sees it: the method only ever gets what crossed the wire.

Faults (all logged in the round record of metrics.jsonl):

- `federation.failure_rate` / `straggler_rate`: each sampled client independently fails
  outright, or misses the round deadline, drawn from the stream (seed, "failures", round);
- a client whose local work raises, or that takes longer than `federation.round_timeout_s`,
  costs only its own update (`failures: [{client, reason}]`); its `ClientState` is left as it was
  (fit works on a copy, committed only on success). If *every* client that ran in a round raised
  (at least two), the first error is re-raised: that is a bug in the method or data, not a fault;
- each upload is decoded under the method's size cap and checked by `server.validate`; a reply
  that fails is dropped (`rejected: [{client, reason}]`) and never reaches the global model;
- a round with fewer than `federation.min_replies` accepted replies is skipped (`skipped: true`)
  or, with `on_too_few = "retry"`, resampled from the stream (seed, "sample", round, "retry", i)
  up to `max_retries` times (`retries`).

Traffic counts every byte sent (records.py): a simulated failure is a client the server cannot
reach (nothing is sent); a straggler got its download; a client over the deadline got its download
and sent its upload too late; rejected replies and replies of a round with too few, every attempt
of a retried round included, count both ways. The round record's `*_accepted` fields count the
aggregated clients alone.

With `federation.checkpoint` (default on) the server's complete state is committed after every
round (runtime/checkpoint.py) and `resume_local` continues an interrupted run bit-identically.
The simulated deadline measures a client's wall time, the one input that is not a function of
the seed: with the default 600 s it never fires on the built-in models.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from thinwire.config import Config
from thinwire.data import Federation, build_federation
from thinwire.errors import UsageError
from thinwire.methods import MethodSpec, get_method
from thinwire.methods.base import ClientState, Reply, RunContext, ServerSide, Workbench
from thinwire.methods.validate import reason as short_reason
from thinwire.methods.validate import rejection as rejection_reason
from thinwire.runtime import records
from thinwire.runtime.checkpoint import Checkpoint, ResumableRunDir, resume_paths
from thinwire.runtime.display import console, make_progress, summary_table
from thinwire.seeding import derive_seed
from thinwire.wire import Payload


def sample_clients(config: Config, rnd: int, attempt: int = 0) -> list[int]:
    """The round's clients: a seeded draw without replacement, independent of earlier rounds
    (`attempt` > 0: the draw of that retry of the round, from its own stream)."""
    fed = config.federation
    keys = ("sample", rnd) if attempt == 0 else ("sample", rnd, "retry", attempt)
    rng = np.random.default_rng(derive_seed(fed.seed, *keys))
    return sorted(rng.choice(fed.clients, size=fed.clients_per_round, replace=False).tolist())


def simulated_faults(config: Config, rnd: int, sampled: list[int], attempt: int = 0) -> dict[int, str]:
    """client -> "failure" | "straggler" for the sampled clients that the simulation knocks out.

    One uniform pair per sampled client (in the sample's order) from the stream
    (seed, "failures", round[, "retry", attempt]): u₀ < failure_rate fails, else u₁ <
    straggler_rate misses the deadline.
    """
    fed = config.federation
    if not (fed.failure_rate or fed.straggler_rate):
        return {}
    keys = ("failures", rnd) if attempt == 0 else ("failures", rnd, "retry", attempt)
    draws = np.random.default_rng(derive_seed(fed.seed, *keys)).random((len(sampled), 2))
    out = {}
    for cid, (u_fail, u_late) in zip(sampled, draws.tolist()):
        if u_fail < fed.failure_rate:
            out[cid] = "failure"
        elif u_late < fed.straggler_rate:
            out[cid] = "straggler"
    return out


def run_local(config: Config, out: Path, quiet: bool = False, *, resume: bool = False) -> dict[str, Any]:
    """Run `config` into `out` (via `<out>.partial`); `resume=True` continues `<out>.partial`."""
    spec = get_method(config.method.name)
    federation = build_federation(config)
    run_dir = ResumableRunDir(out)
    if not resume:
        run_dir.open(config)
    try:
        summary, server = _federate(config, spec, federation, run_dir, quiet, resume)
    except UsageError:
        # bad input found late (model, method options): leave nothing behind unless rounds ran
        if not resume and run_dir.logged == 0:
            run_dir.discard()
        else:
            run_dir.abandon()
        raise
    except BaseException:
        run_dir.abandon()
        raise
    Checkpoint(run_dir.partial).remove()
    run_dir.finish(summary, server)
    if not quiet:
        console.print(summary_table(summary))
        console.print(f"run directory: {out}")
    return summary


def resume_local(path: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Continue the interrupted run at `path` (its --out, or its `.partial` directory)."""
    from thinwire.config import load_config

    out, partial = resume_paths(path)
    config = load_config(partial / "config.toml")
    return run_local(config, out, quiet=quiet, resume=True)


def _copy_state(state: ClientState) -> ClientState:
    return ClientState(tensors={k: t.clone() for k, t in state.tensors.items()}, scalars=dict(state.scalars))


def _federate(config: Config, spec: MethodSpec, federation: Federation, run_dir: ResumableRunDir,
              quiet: bool, resume: bool) -> tuple[dict[str, Any], ServerSide]:
    fed = config.federation
    started = time.perf_counter()
    workbench = Workbench(config)
    workbench.tokenizer  # noqa: B018 -- load the model now: a bad model name fails before any display
    ctx = RunContext(config, workbench, partition_sizes=[len(c) for c in federation.clients])
    warnings = records.Warnings(ctx)
    server, client = spec.server(ctx), spec.client(ctx)
    states = {cid: ClientState() for cid in range(fed.clients)}
    checkpoint = Checkpoint(run_dir.partial)

    def evaluate_global() -> dict[str, float]:
        return records.evaluate_global(config, server, workbench.tokenizer, federation, run_dir)

    progress = make_progress()
    rounds: list[dict[str, Any]] = []
    elapsed_before = 0.0
    with progress if not quiet else contextlib.nullcontext():
        rounds_bar = progress.add_task("rounds", total=fed.rounds)
        clients_bar = progress.add_task("clients", total=fed.clients_per_round)
        steps_bar = progress.add_task("steps", total=client.steps_per_round())
        ctx.on_step = lambda: progress.advance(steps_bar)
        server.setup()
        restored = checkpoint.load(config) if resume else None
        if restored is not None:
            server.load_state_dict(restored.server)
            if restored.client is not None:
                client.load_state_dict(restored.client)
            states = restored.states
            rounds, base_eval, evaluation = restored.rounds, restored.base_eval, restored.evaluation
            elapsed_before = restored.elapsed_s
            progress.update(rounds_bar, completed=restored.round)
        if resume:
            run_dir.reopen(config, rounds)
        if restored is None:
            base_eval = evaluation = evaluate_global()
        for rnd in range(len(rounds) + 1, fed.rounds + 1):
            round_start = time.perf_counter()
            failures: list[dict[str, Any]] = []
            rejected: list[dict[str, Any]] = []
            retries, local_s = 0, 0.0
            while True:
                sampled = sample_clients(config, rnd, retries)
                faults = simulated_faults(config, rnd, sampled, retries)
                progress.reset(clients_bar)
                replies, clients, errors, ran, first_error = [], [], 0, 0, None
                for cid in sampled:
                    progress.advance(clients_bar)
                    if faults.get(cid) == "failure":  # unreachable: its download is never sent
                        failures.append(records.failure(cid, "simulated failure (federation.failure_rate)"))
                        continue
                    progress.reset(steps_bar)
                    t0 = time.perf_counter()
                    down_bytes = server.download(rnd, cid).encode()
                    if faults.get(cid) == "straggler":
                        failures.append(records.failure(
                            cid, f"no reply within {fed.round_timeout_s:g} s (simulated straggler)", len(down_bytes)))
                        continue
                    state = _copy_state(states[cid])
                    ran += 1
                    try:
                        upload = client.fit(rnd, cid, Payload.decode(down_bytes), federation.clients[cid], state)
                        up_bytes = upload.payload.encode()
                    except Exception as exc:  # a crashing client costs its own update, not the run
                        errors += 1
                        first_error = first_error or exc
                        failures.append(records.failure(cid, f"{type(exc).__name__}: {short_reason(exc)}",
                                                        len(down_bytes)))
                        continue
                    finally:
                        local_s += time.perf_counter() - t0
                    took = time.perf_counter() - t0
                    if took > fed.round_timeout_s:  # its upload arrived, too late to be used
                        failures.append(records.failure(
                            cid, f"no reply within {fed.round_timeout_s:g} s (took {took:.1f} s)", len(down_bytes),
                            len(up_bytes)))
                        continue
                    states[cid] = state
                    try:
                        reply = Reply(cid, Payload.decode(up_bytes, max_bytes=server.max_upload_bytes() + (1 << 20)),
                                      upload.num_examples, upload.metrics)
                        server.validate(reply)
                    except Exception as exc:  # a hostile upload may break validation any way: its sender pays
                        rejected.append(records.failure(cid, rejection_reason(exc), len(down_bytes), len(up_bytes)))
                        continue
                    replies.append(reply)
                    clients.append(records.client_record(cid, len(down_bytes), len(up_bytes), upload.num_examples,
                                                         upload.metrics))
                if len(replies) >= fed.min_replies:
                    skipped = False
                    break
                if ran >= 2 and errors == ran and first_error is not None:
                    raise first_error  # every client that ran crashed: a bug, not a client fault
                failures.extend(records.discarded(clients, fed.min_replies))
                if fed.on_too_few == "retry" and retries < fed.max_retries:
                    retries += 1
                    continue
                skipped = True
                break
            aggregate, round_eval, times = records.close_round(config, server, rnd, replies, skipped,
                                                               evaluate_global, local_s, round_start)
            if round_eval is not None:
                evaluation = round_eval
            rounds.append(records.round_record(rnd, spec.name, sampled, [] if skipped else clients, aggregate,
                                               round_eval, times, phase=server.phase(rnd), failures=failures,
                                               rejected=rejected, retries=retries, skipped=skipped,
                                               warnings=warnings.take()))
            run_dir.log_round(rounds[-1])
            if fed.checkpoint and rnd < fed.rounds:
                state = server.state_dict()
                if state is not None:
                    checkpoint.save(config, rnd, state, client.state_dict(), states, run_dir.metrics_mark(),
                                    base_eval, evaluation, elapsed_before + time.perf_counter() - started)
            progress.advance(rounds_bar)
    summary = records.summary(config, spec.name, rounds, base_eval, evaluation, server.trainable_parameters(),
                              elapsed_before + time.perf_counter() - started)
    return summary, server
