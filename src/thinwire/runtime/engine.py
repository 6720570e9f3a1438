"""The round engine: every rule of a federated run, whatever carries the bytes.

One loop, read top to bottom, for every runtime: seeded sampling, simulated faults, the
size cap and validation of every upload, `min_replies` with skip or retry, aggregation,
evaluation, the round records, checkpoints and resume. What differs between runtimes is only
how a round's downloads reach the clients and what comes back: a `Transport` (in-process in
runtime/local.py, Flower messages in runtime/flower.py).

Faults (all logged in the round record of metrics.jsonl):

- `federation.failure_rate` / `straggler_rate`: each sampled client independently fails
  outright, or misses the round deadline, drawn from the stream (seed, "failures", round). A
  failed client is one the server cannot reach (nothing is sent); a straggler got its download
  and its reply never came. The engine decides both before the transport sees the round, so
  the same clients fail in the same rounds on every runtime;
- a client whose work raises, whose machine is gone or that misses `federation.round_timeout_s`
  costs only its own update (`failures: [{client, reason}]`);
- each upload is decoded under the method's size cap and checked by `server.validate`; a reply
  that fails is dropped (`rejected: [{client, reason}]`) and never reaches the global model;
- the round's aggregation is committed only into a finite server state (runtime/commit.py): a
  reply whose presence makes it fail is dropped the same way, before any checkpoint is written;
- a round with fewer than `federation.min_replies` accepted replies is skipped (`skipped: true`)
  or, with `on_too_few = "retry"`, resampled from the stream (seed, "sample", round, "retry", i)
  up to `max_retries` times (`retries`).

Under `privacy.secagg` the engine sets up SecAgg+ keys for clients that have none yet
(`Transport.control`), puts the round's roster in each download, checks each masked upload, and
hands the method one reply holding the unmasked mean (secagg.py), which the method validates as
any upload.
Under DP every download is entered in the privacy ledger before it leaves, central DP clips and
noises the accepted replies before the method's aggregation (privacy.py), and under either no
client's own report (example count, metrics) is used or logged.

Traffic counts every byte sent (records.py). With `federation.checkpoint` (default on) the
server's complete state, and what the transport keeps of the clients, is committed after every
round (runtime/checkpoint.py); a resumed run continues bit-identically.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from thinwire.config import Config
from thinwire.data import Federation, build_federation
from thinwire import privacy, secagg, secret
from thinwire.errors import UsageError
from thinwire.methods import MethodSpec, get_method
from thinwire.methods.base import ClientState, Reply, RunContext, ServerSide, Workbench
from thinwire.methods.validate import rejection as rejection_reason
from thinwire.runtime import records
from thinwire.runtime.checkpoint import Checkpoint, ResumableRunDir
from thinwire.runtime.display import RunDisplay, console, summary_table
from thinwire.runtime.upload import WITHHELD_EXAMPLES, open_envelope
from thinwire.seeding import derive_seed
from thinwire.wire import Payload


@dataclass
class Arrival:
    """What became of one client's download, as the transport saw it."""

    up: bytes | None = None  # the upload's bytes, when any arrived (in time or not)
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None  # why there is no usable upload (None: it arrived in time)
    delivered: bool = True  # the download left the server (its bytes count as sent)
    measured: dict[str, Any] = field(default_factory=dict)  # the transport's own fields for the client record


class Transport(ABC):
    """How a round's downloads reach their clients and what comes back by the deadline."""

    name = "local"

    def bind(self, ctx: RunContext, federation: Federation, progress: Any, run_dir: ResumableRunDir) -> None:
        """Called once, before the server is set up."""

    def start(self, server: ServerSide) -> None:
        """Called once, after the server is set up and before the first round (handshakes)."""

    @abstractmethod
    def exchange(self, rnd: int, downloads: dict[int, bytes]) -> tuple[dict[int, Arrival], float]:
        """Deliver each client its download (client -> bytes, in client order); return an Arrival
        per client and the seconds the clients' work took."""

    @abstractmethod
    def control(self, rnd: int, stage: str, messages: dict[int, bytes]) -> dict[int, bytes | str]:
        """Deliver a secure-aggregation stage message to each client (secagg.py); return each
        client's reply bytes, or why there is none."""

    def state(self) -> tuple[Payload | None, dict[int, ClientState]]:
        """What the transport keeps of the clients, for the checkpoint: shared client-side state
        and each client's ClientState (a transport whose clients keep their own: None, {})."""
        return None, {}

    def restore(self, client: Payload | None, states: dict[int, ClientState]) -> None:
        """Adopt a checkpoint's `state()`."""

    def round_fields(self) -> dict[str, Any]:
        """Extra fields of the round record (reset for the next round)."""
        return {}

    def summary_fields(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        return {}


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


def run(config: Config, out: Path, transport: Transport, *, quiet: bool = False, resume: bool = False,
        runtime: str = "local") -> dict[str, Any]:
    """Run `config` into `out` (via `<out>.partial`) over `transport`; `resume=True` continues
    `<out>.partial` from its checkpoint."""
    spec = get_method(config.method.name)
    federation = build_federation(config)
    run_dir = ResumableRunDir(out)
    if resume:
        run_dir.hold()
    else:
        run_dir.open(config)
    try:
        summary, server = Rounds(config, spec, federation, run_dir, transport, quiet, runtime).run(resume)
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
    return summary


class Rounds:
    """One run's rounds: the state the loop carries, and the loop."""

    def __init__(self, config: Config, spec: MethodSpec, federation: Federation, run_dir: ResumableRunDir,
                 transport: Transport, quiet: bool, runtime: str):
        self.config, self.spec, self.federation, self.run_dir = config, spec, federation, run_dir
        self.transport, self.runtime = transport, runtime
        self.workbench = Workbench(config)
        self.workbench.tokenizer  # noqa: B018 -- load the model now: a bad model name fails before any display
        self.ctx = RunContext(config, self.workbench, partition_sizes=[len(c) for c in federation.clients])
        self.warnings = records.Warnings(self.ctx)
        self.display = RunDisplay(run_dir.partial, config.federation.rounds, quiet)
        transport.bind(self.ctx, federation, self.display.progress, run_dir)
        self.server = spec.server(self.ctx)
        self.checkpoint = Checkpoint(run_dir.partial)
        self.private = privacy.private(config)
        self.ledger = privacy.Ledger(run_dir.partial / privacy.LEDGER) if config.privacy.dp != "none" else None
        self.server_key = secret.new_key()  # central DP's noise key: a resumed run takes its checkpoint's
        self.secure_keys: dict[int, tuple[bytes, bytes]] = {}  # SecAgg+'s public keys, kept for the run

    def evaluate(self) -> dict[str, float]:
        return records.evaluate_global(self.config, self.server, self.workbench.tokenizer, self.federation,
                                       self.run_dir, self.display)

    def run(self, resume: bool) -> tuple[dict[str, Any], ServerSide]:
        fed, server = self.config.federation, self.server
        started = time.perf_counter()
        rounds: list[dict[str, Any]] = []
        elapsed_before = 0.0
        with self.display:
            server.setup()
            restored = self.checkpoint.load(self.config) if resume else None
            if restored is not None:
                server.load_state_dict(restored.server)
                self.server_key = restored.secrets.get("server_key", self.server_key)
                self.transport.restore(restored.client, restored.states)
                rounds, base_eval, evaluation = restored.rounds, restored.base_eval, restored.evaluation
                elapsed_before = restored.elapsed_s
                self.display.resumed(restored.round)
            if resume:
                self.run_dir.reopen(self.config, rounds)
            if restored is None:
                base_eval = evaluation = self.evaluate()
            self.transport.start(server)
            self.central = privacy.CentralDP(self.config, self.server_key) \
                if self.config.privacy.dp == "central" else None
            for rnd in range(len(rounds) + 1, fed.rounds + 1):
                record, round_eval = self.round(rnd)
                if self.ledger is not None:
                    record["epsilon"] = privacy.epsilon(self.config, self.ledger.participations())
                if round_eval is not None:
                    evaluation = round_eval
                rounds.append(record)
                self.run_dir.log_round(record)
                if fed.checkpoint and rnd < fed.rounds:
                    state = server.state_dict()
                    if state is not None:
                        client, states = self.transport.state()
                        self.checkpoint.save(self.config, rnd, state, client, states, self.run_dir.metrics_mark(),
                                             base_eval, evaluation, elapsed_before + time.perf_counter() - started,
                                             secrets={"server_key": self.server_key})
                self.display.round_done(record)
        summary = records.summary(self.config, self.spec.name, rounds, base_eval, evaluation,
                                  server.trainable_parameters(), elapsed_before + time.perf_counter() - started,
                                  runtime=self.runtime, **self.transport.summary_fields(rounds))
        if self.ledger is not None:
            summary["privacy"] = privacy.summary(self.config, self.ledger.participations())
        if self.config.privacy.secagg:
            for key in ("secagg_downlink_bytes", "secagg_uplink_bytes"):
                summary[f"{key}_total"] = sum(r.get(key, 0) for r in rounds)
        return summary, server

    def round(self, rnd: int) -> tuple[dict[str, Any], dict[str, float] | None]:
        """Round `rnd`, retried while it has too few replies and retries are left."""
        fed, server = self.config.federation, self.server
        round_start = time.perf_counter()
        failures: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        retries, local_s = 0, 0.0
        secure_traffic = {"secagg_downlink_bytes": 0, "secagg_uplink_bytes": 0}  # stage messages (secagg.py)
        secure_metrics: dict[str, float] = {}
        while True:
            sampled = sample_clients(self.config, rnd, retries)
            faults = simulated_faults(self.config, rnd, sampled, retries)
            recipients: list[int] = []
            failed: list[dict[str, Any]] = []  # this attempt's, logged in client order
            for cid in sampled:
                if faults.get(cid) == "failure":  # unreachable: its download is never sent
                    failed.append(records.failure(cid, "simulated failure (federation.failure_rate)"))
                elif faults.get(cid) == "straggler":
                    failed.append(records.failure(cid, f"no reply within {fed.round_timeout_s:g} s (simulated straggler)",
                                                  len(server.download(rnd, cid).encode())))
                else:
                    recipients.append(cid)
            secure = self._secure_setup(rnd, retries, recipients, failed) \
                if self.config.privacy.secagg and recipients else None
            downloads = self._downloads(rnd, recipients, secure)
            if self.ledger is not None and downloads:  # persisted before any of them is sent
                self.ledger.record(rnd, retries, list(downloads))
            arrivals, took = self.transport.exchange(rnd, downloads) if downloads else ({}, 0.0)
            local_s += took
            replies, clients = [], []
            for cid, down in downloads.items():
                arrival = arrivals[cid]
                down_len = len(down) if arrival.delivered else None
                up_len = None if arrival.up is None else len(arrival.up)
                if arrival.failure is not None:
                    failed.append(records.failure(cid, arrival.failure[:1000], down_len, up_len))
                    continue
                try:  # the size cap, then the method's own checks (under SecAgg: on the unmasked mean)
                    cap = secure.upload_cap() if secure else server.max_upload_bytes() + (1 << 20)
                    payload = open_envelope(Payload.decode(arrival.up, max_bytes=cap), rnd, cid)
                    if self.central:
                        payload = self.central.screen(payload)
                    reply = Reply(cid, payload, WITHHELD_EXAMPLES, {}) if self.private else \
                        Reply(cid, payload, arrival.num_examples, arrival.metrics)
                    if secure:
                        secure.check(cid, reply.payload)
                    else:
                        server.validate(reply)
                except Exception as exc:  # a hostile upload may break validation any way: its sender pays
                    rejected.append(records.failure(cid, rejection_reason(exc), down_len, up_len))
                    continue
                replies.append(reply)
                examples = None if self.private else reply.num_examples
                clients.append(records.client_record(cid, down_len, up_len, examples, reply.metrics, **arrival.measured))
            del downloads, arrivals
            if secure:
                if replies:
                    replies, clients, left, secure_metrics = self._unmask(secure, replies, clients)
                    failed.extend(left)
                secure_traffic["secagg_downlink_bytes"] += secure.bytes_down
                secure_traffic["secagg_uplink_bytes"] += secure.bytes_up
                for entry in [*failed, *rejected]:  # it may have lost its keys: it makes new ones next time
                    if "downlink_bytes" in entry:
                        self.secure_keys.pop(entry["client"], None)
            failures.extend(sorted(failed, key=lambda entry: entry["client"]))
            if sum(r.contributors for r in replies) >= max(fed.min_replies, 1):
                skipped = False
                break
            failures.extend(records.discarded(clients, fed.min_replies))
            if fed.on_too_few == "retry" and retries < fed.max_retries:
                retries += 1
                continue
            skipped, replies, clients = True, [], []
            break
        dp_metrics: dict[str, float] = {}
        if self.central:
            replies, dp_metrics = self.central.privatize(rnd, replies, self.central.space.dimension(server))
        committed, round_eval, times = records.close_round(self.config, server, rnd, replies, skipped, self.evaluate,
                                                           local_s, round_start)
        clients, dropped = records.apply_commit(clients, committed, pooled=bool(secure), private=self.private)
        rejected.extend(dropped)
        skipped = skipped or not committed.replies
        aggregate = {**committed.metrics, **dp_metrics, **secure_metrics}
        extra = {**self.transport.round_fields(), **(secure_traffic if self.config.privacy.secagg else {}),
                 **({"client_reports": "withheld (privacy)"} if self.private else {})}
        record = records.round_record(rnd, self.spec.name, sampled, clients, aggregate, round_eval, times,
                                      phase=server.phase(rnd), failures=failures, rejected=rejected, retries=retries,
                                      skipped=skipped, warnings=self.warnings.take(), **extra)
        return record, round_eval

    def _downloads(self, rnd: int, clients: list[int], secure: secagg.SecureRound | None) -> dict[int, bytes]:
        """Each client's download, encoded; under SecAgg+ with the round's roster in its scalars."""
        roster = secure.roster() if secure else None
        out = {}
        for cid in clients:
            payload = self.server.download(rnd, cid)
            if roster is not None:
                payload = Payload(tensors=payload.tensors, scalars={**payload.scalars, secagg.ROSTER: roster})
            out[cid] = payload.encode()
        return out

    def _secure_setup(self, rnd: int, attempt: int, clients: list[int], failed: list[dict[str, Any]]
                      ) -> secagg.SecureRound:
        """SecAgg+'s keys for the clients that have none yet; a client that cannot take part is
        logged in `failed` and dropped from `clients` (its download is not sent)."""
        secure = secagg.SecureRound(self.config, rnd, attempt, lambda stage, messages: self.transport.control(
            rnd, stage, messages), privacy.update_space(self.config).dimension(self.server), self.secure_keys)
        for cid, reason in secure.setup(list(clients)).items():
            failed.append(records.failure(cid, reason))
            clients.remove(cid)
        return secure

    def _unmask(self, secure: secagg.SecureRound, replies: list[Reply], clients: list[dict[str, Any]]
                ) -> tuple[list[Reply], list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
        """The round's masked replies as one reply holding their mean, checked by the method, and
        the client records of those it covers; if it cannot be had, every reply becomes a failure."""
        try:
            mean, metrics = secure.unmask({r.client_id: r.payload for r in replies})
            covered = [r for r in replies if r.client_id in secure.unmasked]
            examples = sum(r.num_examples for r in covered) // len(covered)  # equal weights: the count is a label
            merged = Reply(covered[0].client_id, mean, examples, {}, contributors=len(covered))
            self.server.validate(merged)
        except Exception as exc:  # too few shares, a bad layout, a mean the method refuses: the round's loss
            reason = f"secure aggregation failed: {rejection_reason(exc)}"
            return [], [], [records.failure(c["client"], reason, c["downlink_bytes"], c["uplink_bytes"])
                            for c in clients], {}
        if secure.corrupt:
            self.ctx.warn(f"secure aggregation: clients {sorted(secure.corrupt)} sent shares that rebuild no committed "
                          "secret; the round was unmasked from the others' shares")
        if metrics["secagg_clipped"]:
            self.ctx.warn(f"secure aggregation clipped update values to ±{self.config.privacy.secagg_clip_range:g} "
                          "(round records: secagg_clipped); raise privacy.secagg_clip_range above the updates' range")
        kept = [c for c in clients if c["client"] in secure.unmasked]
        left = [records.failure(c["client"], "secure aggregation: its upload's layout differs from the round's",
                                c["downlink_bytes"], c["uplink_bytes"]) for c in clients if c["client"] not in secure.unmasked]
        return [merged], kept, left, metrics
