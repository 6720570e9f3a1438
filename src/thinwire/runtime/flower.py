"""thinwire on Flower: one ServerApp and one ClientApp that host any thinwire method unchanged.

Two ways to run them:

- `run_flower_sim(config, out)` (`thinwire run --runtime flower-sim`): Flower's simulation engine
  (`flwr.simulation.run_simulation`) with one virtual SuperNode per thinwire client; the ServerApp
  runs in this process, ClientApps run in Ray actors.
- Deployment (docs/flower.md): `flwr run .` against a SuperLink, with one SuperNode per data owner
  started as `flower-supernode --node-config "partition-id=<i> num-partitions=<N>"`
  (see `thinwire.runtime.deploy`). The components are `server_app` and `client_app` of this module;
  the run config keys `config`, `set` and `out` name the experiment (see `config_from_run_config`).

The server side is the local runtime's loop: `server.setup()`, base evaluation, then per round the
same seeded sample (`sample_clients`), one download per sampled client, `server.aggregate`, the
same evaluation, the same run directory (records.py, RunDir). What changes is transport:

- Each thinwire client id is a Flower *partition id*. Before round 1 the server sends every
  SuperNode a `query.thinwire_hello` carrying the resolved config (TOML); the ClientApp keeps it in
  `Context.state` and answers with the partition id it owns (`node_config["partition-id"]`),
  which maps client ids to node ids. A node that is missing, or lost its state, is asked again
  when its client is next sampled.
- A download travels as a `train.thinwire_fit` message whose ArrayRecord holds one `Array` of
  dtype uint8 and stype `thinwire.payload`: the encoded Payload bytes, untouched. An Array
  rather than a bytes value in a ConfigRecord, because Flower splits Arrays into 5 MB chunks (a
  full-weight FedAvg download is hundreds of MB; a single ConfigRecord value would have to fit
  one transport message) and deduplicates identical chunks; and because decoding stays ours
  (`Payload.decode` validates everything; Flower's numpy path never runs, nothing is unpickled).
- The ClientApp decodes, runs `client.fit` with the client's `ClientState` (kept in
  `Context.state` as encoded Payload bytes, the same Array form) and replies with the upload
  bytes, the example count and the client's metrics (a MetricRecord).
- Traffic is thinwire's payload bytes, counted exactly as the local runtime counts them
  (records.py): every download the SuperLink accepted counts, whatever became of the client, and
  every reply that arrived (malformed, rejected or discarded for a round with too few included);
  a reply that never arrived before the deadline is not seen, so not counted. Flower's own size
  of each message (every object of the message tree as deflated for transport: message header,
  records, array metadata and chunks) is logged beside it as `flower_downlink_bytes` /
  `flower_uplink_bytes` (per round: all messages; per client: that client's), so the framing
  overhead is visible. Warnings the server side raises (`RunContext.warn`) land in the round
  record; a client's stay in its process's stderr.
- A client whose ClientApp raises, whose node is gone, or that does not answer within
  `federation.round_timeout_s` costs that client's update for the round; it is logged in the
  round record under `failures` and the run goes on. A round in which no client answered skips
  aggregation.

In deployment a SuperNode starts the ClientApp afresh for every message: the base model is
reloaded from its cached safetensors each time, and methods that keep a model replica
(`ReplicaClient`) resume it from `$THINWIRE_REPLICAS` (default `$THINWIRE_CACHE/replicas`).
In simulation the Ray actors persist, so the workbench and replica are reused across messages.

Heavy imports (torch, transformers, the methods) happen inside the handlers, so a hello message
costs a node little more than starting Python and Flower.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from thinwire.config import Config, from_dict, load_config, to_toml
from thinwire.errors import UsageError
from thinwire.seeding import random_fingerprint

if TYPE_CHECKING:
    from thinwire.methods.base import ClientSide

HELLO = "query.thinwire_hello"
FIT = "train.thinwire_fit"
STYPE = "thinwire.payload"
META = "thinwire"            # ConfigRecord: round, client, config digest, counts
PAYLOAD = "payload"          # ArrayRecord holding one Array of payload bytes
METRICS = "metrics"          # MetricRecord: the client's upload metrics
STATE_CONFIG = "thinwire.config"  # Context.state keys on the client
STATE_CLIENT = "thinwire.client-state"
PARTITION_ID = "partition-id"
FINGERPRINT = "random-fingerprint"
BASE_DIGEST = "base-digest"
DATA_PATH = "data-path"
DEFAULT_ROUND_TIMEOUT_S = 600.0
POLL_S = 0.25


# --- wire helpers ---------------------------------------------------------------------------

def pack(data: bytes) -> ArrayRecord:
    """Payload bytes as a one-Array record (uint8, stype `thinwire.payload`)."""
    return ArrayRecord({PAYLOAD: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=bytes(data))})


def unpack(record: ArrayRecord) -> bytes:
    array = record.get(PAYLOAD)
    if array is None or array.stype != STYPE or array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
        raise ValueError("message does not carry a thinwire payload")
    return array.data


def flower_bytes(message: Message) -> int:
    """Flower's size of a message: every distinct object of its tree as deflated for transport."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CLASS_PREFIX = re.compile(r"^<class '([\w.()]+)'>:<'")  # Flower's str(type(ex)) + ":<'" + str(ex) + "'>"
_WRAPPER = re.compile(r"ClientAppException|RayTaskError|RayActorError")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b[^\n]*")


def short_reason(text: str) -> str:
    """The telling line of an error report (Flower wraps ClientApp tracebacks in Ray's and its
    own text): the last `SomeError: message` line, else the first line."""
    text = _CLASS_PREFIX.sub(lambda m: f"{m.group(1).rsplit('.', 1)[-1]}: ", _ANSI.sub("", str(text)))
    text = text[:-2] if text.endswith("'>") else text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = [line for line in lines if _EXCEPTION_LINE.match(line)]
    own = [line for line in found if not _WRAPPER.search(line)]  # the ClientApp's, not Flower's/Ray's
    return ((own or found)[-1] if found else lines[0] if lines else "unknown error")[:500]


def round_timeout(config: Config) -> float:
    return float(getattr(config.federation, "round_timeout_s", DEFAULT_ROUND_TIMEOUT_S))


# --- server side ----------------------------------------------------------------------------

@dataclass
class _Link:
    """What the server knows of the federation's nodes: partition (client id) -> node id."""

    grid: Grid
    hello: RecordDict
    timeout_s: float
    nodes: dict[int, int] = field(default_factory=dict)
    flower_bytes: int = 0
    # what a node must match to join (`refusal`): the base weights' digest, and the random
    # fingerprint where the method rebuilds state from shared seeds
    expected: dict[str, str] = field(default_factory=dict)
    warn: Callable[[str], None] = print

    def discover(self, wanted: set[int], wait: bool) -> None:
        """Ask nodes not yet mapped which partition they own; with `wait`, until all of `wanted`
        are mapped or the round timeout passes (nodes may still be connecting)."""
        deadline = time.monotonic() + self.timeout_s
        asked: set[int] = set()
        while True:
            online = set(self.grid.get_node_ids())
            self.nodes = {cid: node for cid, node in self.nodes.items() if node in online}
            fresh = sorted(online - set(self.nodes.values()) - asked)
            if fresh:
                asked.update(fresh)
                messages = [Message(self.hello, dst_node_id=node, message_type=HELLO, ttl=self.timeout_s)
                            for node in fresh]
                self.flower_bytes += sum(flower_bytes(m) for m in messages)
                replies, _ = exchange(self.grid, messages, max(1.0, deadline - time.monotonic()))
                for reply in replies.values():
                    if reply.has_error():
                        log(logging.WARNING, "node %s refused the hello: %s", reply.metadata.src_node_id,
                            reply.error.reason)
                        continue
                    self._adopt(reply)
            if wanted <= self.nodes.keys() or not wait or time.monotonic() >= deadline:
                return
            time.sleep(1.0)

    def _adopt(self, reply: Message) -> None:
        self.flower_bytes += flower_bytes(reply)
        node = reply.metadata.src_node_id
        try:
            cid = int(reply.content[META][PARTITION_ID])
        except (KeyError, TypeError, ValueError):
            log(logging.WARNING, "node %s sent a malformed hello reply", node)
            return
        reason = refusal(dict(reply.content[META]), self.expected)
        if reason is not None:
            self.warn(f"the node of partition {cid} was refused: {reason}")
            return
        if cid in self.nodes and self.nodes[cid] != node:
            self.warn(f"nodes {self.nodes[cid]} and {node} both claim partition {cid}; keeping the first "
                      "(start every SuperNode with its own partition-id, and use node authentication)")
            return
        self.nodes[cid] = node

    def forget(self, cid: int) -> None:
        self.nodes.pop(cid, None)


def refusal(hello: dict[str, Any], expected: dict[str, str]) -> str | None:
    """Why a node whose hello reply is `hello` may not join (None: it may)."""
    if BASE_DIGEST in expected and hello.get(BASE_DIGEST) != expected[BASE_DIGEST]:
        return "its base model's weights differ from the server's (another checkpoint or model.name)"
    if FINGERPRINT in expected and hello.get(FINGERPRINT) != expected[FINGERPRINT]:
        return ("it draws other random bits from the same seeds (its torch kernels differ: set "
                "ATEN_CPU_CAPABILITY alike on every machine), so its replica would drift from the server's")
    return None


def exchange(grid: Grid, messages: list[Message], timeout_s: float) -> tuple[dict[int, Message], set[int]]:
    """Push `messages`, pull replies until all arrived or `timeout_s` passed.

    Returns the replies by index into `messages`, and the indices whose push failed.
    (Grid.send_and_receive polls every 3 s on a deployment; this polls every 0.25 s.)
    """
    ids = list(grid.push_messages(messages))
    failed = {i for i, mid in enumerate(ids) if not mid}
    waiting = {mid: i for i, mid in enumerate(ids) if mid}
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout_s
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            index = waiting.pop(reply.metadata.reply_to_message_id, None)
            if index is not None:
                replies[index] = reply
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return replies, failed


def serve(grid: Grid, config: Config, out: Path, quiet: bool = True, runtime: str = "flower") -> dict[str, Any]:
    """The ServerApp's whole run; writes the run directory and returns the summary."""
    from thinwire.data import build_federation
    from thinwire.methods import get_method
    from thinwire.runtime.rundir import RunDir

    spec = get_method(config.method.name)
    federation = build_federation(config)
    run_dir = RunDir(out)
    run_dir.open(config)
    try:
        summary, server = _federate(grid, config, spec, federation, run_dir, quiet, runtime)
    except BaseException:
        run_dir.abandon()
        raise
    run_dir.finish(summary, server)
    return summary


def _federate(grid, config, spec, federation, run_dir, quiet, runtime):
    from thinwire.methods.base import Reply, RunContext, Workbench
    from thinwire.runtime import records
    from thinwire.runtime.display import make_progress
    from thinwire.methods.validate import rejection as rejection_reason
    from thinwire.runtime.local import sample_clients
    from thinwire.wire import Payload

    fed = config.federation
    started = time.perf_counter()
    timeout_s = round_timeout(config)
    workbench = Workbench(config)
    ctx = RunContext(config, workbench, partition_sizes=[len(c) for c in federation.clients])
    warnings = records.Warnings(ctx)  # the server's (a client's warnings stay in its process)
    if fed.failure_rate or fed.straggler_rate:
        ctx.warn("federation.failure_rate and straggler_rate are simulated by the local runtime only; "
                 "on Flower, clients fail for real or not at all")
    if fed.on_too_few == "retry":
        ctx.warn("federation.on_too_few = 'retry' is not implemented on Flower: a round with too few replies "
                 "is skipped")
    server = spec.server(ctx)
    text = to_toml(config)
    digest = config_digest(text)
    link = _Link(grid, RecordDict({META: ConfigRecord({"config": text, "config-sha": digest})}), timeout_s,
                 warn=ctx.warn)

    def evaluate_global() -> dict[str, float]:
        return records.evaluate_global(config, server, workbench.tokenizer, federation, run_dir)

    progress = make_progress()
    rounds: list[dict[str, Any]] = []
    with progress if not quiet else contextlib.nullcontext():
        rounds_bar = progress.add_task("rounds", total=fed.rounds)
        server.setup()
        link.expected[BASE_DIGEST] = server.ctx.workbench.base_digest  # the model devices start from
        if server.needs_shared_draws:
            link.expected[FINGERPRINT] = random_fingerprint()
        base_eval = evaluation = evaluate_global()
        link.discover(set(range(fed.clients)), wait=True)
        missing = sorted(set(range(fed.clients)) - link.nodes.keys())
        log(logging.INFO, "thinwire: %d of %d partitions have a node%s", len(link.nodes), fed.clients,
            f" (missing: {missing})" if missing else "")
        for rnd in range(1, fed.rounds + 1):
            round_start = time.perf_counter()
            sampled = sample_clients(config, rnd)
            hello_bytes = link.flower_bytes
            if not set(sampled) <= link.nodes.keys():
                link.discover(set(sampled), wait=False)
            failures: list[dict[str, Any]] = []
            rejected: list[dict[str, Any]] = []
            messages, targets, sent = [], [], {}
            for cid in sampled:
                if cid not in link.nodes:
                    failures.append(records.failure(cid, "no SuperNode owns this partition"))
                    continue
                down = server.download(rnd, cid).encode()
                content = RecordDict({PAYLOAD: pack(down), META: ConfigRecord(
                    {"round": rnd, "client": cid, "config-sha": digest})})
                message = Message(content, dst_node_id=link.nodes[cid], message_type=FIT,
                                  group_id=str(rnd), ttl=timeout_s)
                messages.append(message)
                targets.append(cid)
                sent[cid] = (len(down), flower_bytes(message))
                del down, content
            t0 = time.perf_counter()
            replies, push_failed = exchange(grid, messages, timeout_s) if messages else ({}, set())
            local_s = time.perf_counter() - t0
            del messages
            accepted: list[tuple[int, Reply, dict[str, Any]]] = []
            flower_down = sum(sent[cid][1] for index, cid in enumerate(targets) if index not in push_failed)
            flower_up = sum(flower_bytes(reply) for reply in replies.values())
            for index, cid in enumerate(targets):
                reply = replies.pop(index, None)  # drop each reply's bytes once decoded
                reason, up = None, None
                down_len = None if index in push_failed else sent[cid][0]  # the download left the server
                if index in push_failed:
                    reason = "the SuperLink did not accept the message"
                elif reply is None:
                    reason = f"no reply within {timeout_s:g} s"
                elif reply.has_error():
                    reason = f"{short_reason(reply.error.reason)} (Flower error code {reply.error.code})"
                    log(logging.DEBUG, "thinwire: client %d error: %s", cid, reply.error.reason)
                if reason is None:
                    try:
                        up = unpack(reply.content[PAYLOAD])  # bytes that arrived count, malformed or not
                        meta = reply.content[META]
                        if int(meta["client"]) != cid:
                            raise ValueError(f"reply is for client {meta['client']}")
                        metrics = dict(reply.content[METRICS]) if METRICS in reply.content else {}
                        examples = int(meta["num-examples"])
                    except Exception as exc:  # a malformed reply costs that client, not the run
                        reason = f"malformed reply: {exc}"
                if reason is not None:
                    failures.append(records.failure(cid, reason[:1000], down_len, None if up is None else len(up)))
                    link.forget(cid)  # ask its node again when next sampled (it may have restarted)
                    continue
                try:  # the same checks as the local runtime: size cap, then the method's validation
                    decoded = Payload.decode(up, max_bytes=server.max_upload_bytes() + (1 << 20))
                    server.validate(Reply(cid, decoded, examples, metrics))
                except Exception as exc:  # a hostile upload may break validation any way: its sender pays
                    rejected.append(records.failure(cid, rejection_reason(exc), down_len, len(up)))
                    continue
                record = records.client_record(
                    cid, down_len, len(up), examples, metrics, node=reply.metadata.src_node_id,
                    flower_downlink_bytes=sent[cid][1], flower_uplink_bytes=flower_bytes(reply),
                    clientapp_age_s=float(meta.get("process-age-s", -1.0)), import_s=float(meta.get("import-s", 0.0)),
                    setup_s=float(meta.get("setup-s", 0.0)))
                accepted.append((cid, Reply(cid, decoded, examples, metrics), record))
                del reply, up
            accepted.sort(key=lambda item: item[0])  # aggregate in client order, as the local runtime does
            failures.sort(key=lambda f: f["client"])
            for failure in failures:
                log(logging.WARNING, "thinwire: round %d: client %d failed: %s", rnd, failure["client"],
                    failure["reason"])
            skipped = len(accepted) < max(fed.min_replies, 1)
            if skipped and accepted:
                failures.extend(records.discarded([record for _, _, record in accepted], fed.min_replies))
                accepted = []
            aggregate, round_eval, times = records.close_round(
                config, server, rnd, [r for _, r, _ in accepted], skipped, evaluate_global, local_s, round_start)
            if round_eval is not None:
                evaluation = round_eval
            clients = [record for _, _, record in accepted]
            rounds.append(records.round_record(
                rnd, spec.name, sampled, clients, aggregate, round_eval, times, phase=server.phase(rnd),
                failures=failures, rejected=rejected, skipped=skipped, warnings=warnings.take(),
                flower_downlink_bytes=flower_down, flower_uplink_bytes=flower_up,
                flower_control_bytes=link.flower_bytes - hello_bytes))
            run_dir.log_round(rounds[-1])
            log(logging.INFO, "thinwire: round %d/%d: %d/%d clients ok, %d B down, %d B up%s", rnd, fed.rounds,
                len(clients), len(sampled), rounds[-1]["downlink_bytes"], rounds[-1]["uplink_bytes"],
                f", loss {round_eval['loss']:.4f}" if round_eval and "loss" in round_eval else "")
            progress.advance(rounds_bar)
    summary = records.summary(
        config, spec.name, rounds, base_eval, evaluation, server.trainable_parameters(),
        time.perf_counter() - started, runtime=runtime,
        flower_downlink_bytes_total=sum(r["flower_downlink_bytes"] for r in rounds),
        flower_uplink_bytes_total=sum(r["flower_uplink_bytes"] for r in rounds),
        flower_control_bytes_total=link.flower_bytes,
        failures_total=sum(len(r["failures"]) for r in rounds))
    return summary, server


# --- client side ----------------------------------------------------------------------------

@dataclass
class _Host:
    """A client process's materialised run: config, workbench and method client side."""

    config: Config
    digest: str
    client: ClientSide
    examples: dict[tuple[int, str], list[dict]] = field(default_factory=dict)

    def examples_for(self, partition: int, data_path: str) -> list[dict]:
        key = (partition, data_path)
        if key not in self.examples:
            self.examples.clear()
            self.examples[key] = _load_examples(self.config, partition, data_path)
        return self.examples[key]


_HOST: _Host | None = None  # one run per process; a new run replaces it (memory stays bounded)


def _load_examples(config: Config, partition: int, data_path: str) -> list[dict]:
    """A node's examples: its own data file when `data-path` is in its node config, else its
    partition of the federation the config describes (the simulation's data)."""
    if data_path:
        from thinwire.data.readers import read_examples

        data = config.data
        fields = {"instruction": data.instruction_field, "input": data.input_field,
                  "output": data.output_field, "category": data.category_field}
        examples = read_examples(data_path, data.format, fields)
        if not examples:
            raise UsageError(f"data file {data_path} holds no examples")
        return examples
    from thinwire.data import build_federation

    return build_federation(config).clients[partition]


def _host(context: Context) -> tuple[_Host, float]:
    """The process's host for the run whose config this node received; built on first use."""
    global _HOST
    saved = context.state.config_records.get(STATE_CONFIG)
    if saved is None:
        raise RuntimeError("thinwire: this node has no config for the run (it restarted?); "
                           "the server will send it again")
    text, digest = str(saved["config"]), str(saved["config-sha"])
    if _HOST is not None and _HOST.digest == digest:
        return _HOST, 0.0
    t0 = time.perf_counter()
    _HOST = None
    from thinwire.methods import get_method
    from thinwire.methods.base import RunContext, Workbench

    config = from_dict(tomllib.loads(text))
    ctx = RunContext(config, Workbench(config))
    client = get_method(config.method.name).client(ctx)
    if hasattr(client, "replica_dir"):  # ReplicaClient: survive a fresh process per message
        client.replica_dir = replica_root() / f"{context.run_id}-{digest[:12]}"
    ctx.workbench.tokenizer  # noqa: B018 - load the base model now, so setup_s measures it
    _HOST = _Host(config, digest, client)
    return _HOST, time.perf_counter() - t0


def replica_root() -> Path:
    """Where ReplicaClient keeps replicas between ClientApp processes on this machine."""
    value = os.environ.get("THINWIRE_REPLICAS", "").strip()
    if value:
        return Path(value).expanduser()
    from thinwire.models.smollm2 import cache_root

    return cache_root() / "replicas"


def process_age() -> float:
    """Seconds since this process started (Linux; -1 elsewhere): how long a fresh ClientApp
    process took to reach the handler, or how long a simulation actor has lived."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return -1.0


def _partition(context: Context) -> int:
    value = context.node_config.get(PARTITION_ID)
    if value is None:
        raise RuntimeError("thinwire: this SuperNode has no partition-id; start it with "
                           "--node-config 'partition-id=<i> num-partitions=<N>'")
    return int(value)


client_app = ClientApp()


@client_app.query("thinwire_hello")
def _hello(message: Message, context: Context) -> Message:
    """Keep the run's config in Context.state; answer with the partition this node owns."""
    meta = message.content[META]
    text, digest = str(meta["config"]), str(meta["config-sha"])
    if config_digest(text) != digest:
        raise ValueError("config digest does not match the config text")
    partition = _partition(context)
    clients = int(tomllib.loads(text).get("federation", {}).get("clients", 0) or 0)
    if clients and not 0 <= partition < clients:
        raise ValueError(f"partition-id {partition} is outside the run's {clients} clients")
    context.state[STATE_CONFIG] = ConfigRecord({"config": text, "config-sha": digest})
    host, _ = _host(context)
    claims = {PARTITION_ID: partition, FINGERPRINT: random_fingerprint(),
              BASE_DIGEST: host.client.ctx.workbench.base_digest}
    return Message(RecordDict({META: ConfigRecord(claims)}), reply_to=message)


@client_app.train("thinwire_fit")
def _fit(message: Message, context: Context) -> Message:
    """Decode the download, run the method's client side with this client's state, reply."""
    entered, age = time.perf_counter(), process_age()
    from thinwire.methods.base import ClientState
    from thinwire.wire import Payload

    import_s = time.perf_counter() - entered
    host, setup_s = _host(context)
    meta = message.content[META]
    rnd, cid = int(meta["round"]), int(meta["client"])
    partition = _partition(context)
    if cid != partition:
        raise RuntimeError(f"thinwire: message for client {cid} reached the node of partition {partition}")
    if str(meta["config-sha"]) != host.digest:
        raise RuntimeError("thinwire: the server's config differs from the one this node holds")
    download = Payload.decode(unpack(message.content[PAYLOAD]))
    saved = context.state.array_records.get(STATE_CLIENT)
    state = ClientState.decode(unpack(saved)) if saved is not None else ClientState()
    examples = host.examples_for(partition, str(context.node_config.get(DATA_PATH, "") or ""))
    upload = host.client.fit(rnd, cid, download, examples, state)
    up = upload.payload.encode()
    context.state[STATE_CLIENT] = pack(state.encode())
    metrics = {k: v for k, v in upload.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    content = RecordDict({
        PAYLOAD: pack(up),
        META: ConfigRecord({"client": cid, "num-examples": int(upload.num_examples), "setup-s": float(setup_s),
                            "import-s": float(import_s), "process-age-s": float(age)}),
        METRICS: MetricRecord(metrics),
    })
    return Message(content, reply_to=message)


# --- deployment entry point -----------------------------------------------------------------

def config_from_run_config(run_config: dict[str, Any]) -> tuple[Config, Path]:
    """The experiment named by a run's config (`[tool.flwr.app.config]`, `flwr run --run-config`):

    - `config`: a thinwire TOML on the server: absolute, relative to the server's working
      directory, or the name of a built-in example (`quickstart.toml`, `smoke.toml`);
    - `set`: overrides `section.key=value`, separated by `;` or newlines;
    - `out`: the run directory on the server ('' = `runs/<method>-<time>`).
    """
    from thinwire.config import EXAMPLES, default_config

    name = str(run_config.get("config", "") or "")
    path = Path(name).expanduser() if name else default_config()
    if not path.is_file():
        for candidate in (EXAMPLES / name, EXAMPLES / Path(name).name):
            if name and candidate.is_file():
                path = candidate
                break
    overrides = [item.strip() for chunk in str(run_config.get("set", "") or "").splitlines()
                 for item in chunk.split(";") if item.strip()]
    config = load_config(path, overrides)
    out = str(run_config.get("out", "") or "")
    return config, Path(out) if out else Path("runs") / f"{config.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    config, out = config_from_run_config(dict(context.run_config))
    log(logging.INFO, "thinwire: %s on %s, %d clients, %d rounds -> %s", config.method.name, config.model.name,
        config.federation.clients, config.federation.rounds, out.resolve())
    serve(grid, config, out, quiet=True, runtime="flower")


# --- simulation -----------------------------------------------------------------------------

def make_server_app(config: Config, out: Path, quiet: bool, result: dict[str, Any],
                    runtime: str = "flower-sim") -> ServerApp:
    """A ServerApp bound to one experiment (the simulation's); the summary lands in `result`."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        result["run_id"] = grid.run.run_id
        result["summary"] = serve(grid, config, out, quiet=quiet, runtime=runtime)

    return app


def simulation_backend(config: Config, num_cpus: int | None = None) -> dict[str, Any]:
    """Ray settings: one CPU per client, as many concurrent clients as cores allow (at most one
    per sampled client), GPUs shared among them when present, Ray's own logging quiet."""
    import torch

    fed = config.federation
    cores = num_cpus or os.cpu_count() or 1
    actors = max(1, min(cores, fed.clients_per_round, fed.clients))
    init_args: dict[str, Any] = {"num_cpus": actors, "logging_level": logging.ERROR, "log_to_driver": False,
                                 "include_dashboard": False}
    resources: dict[str, float] = {"num_cpus": 1, "num_gpus": 0.0}
    if torch.cuda.is_available() and config.model.device != "cpu":
        gpus = torch.cuda.device_count()
        init_args["num_gpus"] = gpus
        resources["num_gpus"] = min(1.0, gpus / actors)
    return {"init_args": init_args, "client_resources": resources}


def run_flower_sim(config: Config, out: Path, quiet: bool = False, *, num_cpus: int | None = None,
                   client_app: ClientApp | None = None) -> dict[str, Any]:
    """`thinwire run --runtime flower-sim`: the experiment on Flower's simulation engine.

    Writes the same run directory as `run_local` and returns the summary. `num_cpus` bounds the
    concurrent clients (default: the machine's cores). `client_app` replaces this module's
    ClientApp (tests wrap it to inject failures).
    """
    from flwr.simulation import run_simulation

    from thinwire.methods import get_method
    from thinwire.runtime.display import console, summary_table

    out = Path(out)
    get_method(config.method.name)  # fail before Ray starts
    if out.exists():
        raise UsageError(f"output directory {out} already exists; pass a new --out or remove it")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    replicas = tempfile.mkdtemp(prefix="thinwire-replicas-")
    previous_replicas = os.environ.get("THINWIRE_REPLICAS")
    os.environ["THINWIRE_REPLICAS"] = replicas  # Ray workers inherit it; removed with the run
    flwr_logger = logging.getLogger("flwr")
    previous_level = flwr_logger.level
    flwr_logger.setLevel(logging.CRITICAL + 1 if quiet else logging.ERROR)
    result: dict[str, Any] = {}
    try:
        run_simulation(make_server_app(config, out, quiet, result), client_app or globals()["client_app"],
                       num_supernodes=config.federation.clients,
                       backend_config=simulation_backend(config, num_cpus))
    finally:
        flwr_logger.setLevel(previous_level)
        shutil.rmtree(replicas, ignore_errors=True)
        if previous_replicas is None:
            os.environ.pop("THINWIRE_REPLICAS", None)
        else:
            os.environ["THINWIRE_REPLICAS"] = previous_replicas
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without a summary; see the log above")
    if not quiet:
        console.print(summary_table(result["summary"]))
        console.print(f"run directory: {out}")
    return result["summary"]
