"""thinwire on Flower: one ServerApp and one ClientApp that host any thinwire method unchanged.

Two ways to run them:

- `run_flower_sim(config, out)` (`thinwire run --runtime flower-sim`): Flower's simulation engine
  (`flwr.simulation.run_simulation`) with one virtual SuperNode per thinwire client; the ServerApp
  runs in this process, ClientApps run in Ray actors.
- Deployment (docs/flower.md): `flwr run .` against a SuperLink, with one SuperNode per data owner
  started as `flower-supernode --node-config "partition-id=<i> num-partitions=<N>"`
  (see `thinwire.runtime.deploy`). The components are `server_app` and `client_app` of this module;
  the run config keys `config`, `set` and `out` name the experiment (see `config_from_run_config`).

The server side is the round engine every runtime shares (runtime/engine.py: sampling,
simulated faults, validation, retries, aggregation, evaluation, records, checkpoints and
`--resume`) over a Flower transport (runtime/flower_server.py). What changes is transport:

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
- The ClientApp decodes, runs `client.fit` with the client's `ClientState` and replies with the
  upload bytes, the example count and the client's metrics (a MetricRecord). The state lives on
  the node's disk, by round (`load_client_state`), under `$THINWIRE_REPLICAS/<run key>`: the run
  key (RunDir.run_key) outlives Flower's run id, so a ServerApp resumed from its checkpoint finds
  every client's state, and every replica, as of the checkpoint's round.
- Under `privacy.secagg`, SecAgg+'s two control messages (a client's key setup, once per run,
  and each round's unmask) travel as `query.thinwire_secagg` messages whose ArrayRecord holds the
  message's bytes (secagg.py); the node keeps its protocol state (keys, its share of its round
  seed) in `Context.state`, and joins the round's roster and masks its upload in
  `train.thinwire_fit`.
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
  round record under `failures` and the run goes on; the engine's too-few rule (skip or retry)
  applies as on the local runtime.

In deployment a SuperNode starts the ClientApp afresh for every message: the base model is
reloaded from its cached safetensors each time, and methods that keep a model replica
(`ReplicaClient`) resume it from `$THINWIRE_REPLICAS` (default `$THINWIRE_CACHE/replicas`).
In simulation the Ray actors persist, so the workbench and replica are reused across messages,
and `$THINWIRE_REPLICAS` is `<out>.partial/nodes` (removed when the run finishes).

Heavy imports (torch, transformers, the methods) happen inside the handlers, so a hello message
costs a node little more than starting Python and Flower.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from thinwire.config import Config, from_dict, load_config
from thinwire.errors import UsageError
from thinwire.runtime.flower_wire import (BASE_DIGEST, DATA_PATH, FINGERPRINT, META, METRICS, PARTITION_ID, PAYLOAD,
                                          RUN_KEY, STATE_CONFIG, STATE_SECAGG, config_digest, pack, unpack)
from thinwire.seeding import random_fingerprint

if TYPE_CHECKING:
    from thinwire.methods.base import ClientSide, ClientState
    from thinwire.secagg import SecAggClient

# --- client side ----------------------------------------------------------------------------

@dataclass
class _Host:
    """A client process's materialised run: config, workbench and method client side."""

    config: Config
    digest: str
    run_key: str
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
    run_key = str(saved.get(RUN_KEY, digest[:20]))
    if _HOST is not None and _HOST.digest == digest and _HOST.run_key == run_key:
        return _HOST, 0.0
    t0 = time.perf_counter()
    _HOST = None
    from thinwire.methods import get_method
    from thinwire.methods.base import RunContext, Workbench

    config = from_dict(tomllib.loads(text))
    ctx = RunContext(config, Workbench(config))
    client = get_method(config.method.name).client(ctx)
    if hasattr(client, "replica_dir"):  # ReplicaClient: survive a fresh process per message
        client.replica_dir = replica_root() / run_key
    ctx.workbench.tokenizer  # noqa: B018 - load the base model now, so setup_s measures it
    _HOST = _Host(config, digest, run_key, client)
    return _HOST, time.perf_counter() - t0


def replica_root() -> Path:
    """Where ReplicaClient keeps replicas between ClientApp processes on this machine."""
    value = os.environ.get("THINWIRE_REPLICAS", "").strip()
    if value:
        return Path(value).expanduser()
    from thinwire.models.smollm2 import cache_root

    return cache_root() / "replicas"


def load_client_state(store: Path, cid: int, rnd: int) -> ClientState:
    """Client `cid`'s state as it was before round `rnd`: its newest stored round below `rnd`.

    A client's state lives on its node's disk, by round, rather than in Flower's Context (which
    lasts one run): a ServerApp that resumes from its round-k checkpoint reruns round k+1, and
    finds each client's state as of round k even where a node had already finished k+1."""
    from thinwire.methods.base import ClientState

    rounds = sorted(r for r in _stored_rounds(store, cid) if r < rnd)
    return ClientState.decode((store / f"c{cid}-r{rounds[-1]}").read_bytes()) if rounds else ClientState()


def save_client_state(store: Path, cid: int, rnd: int, state: ClientState) -> None:
    """Store the state after round `rnd`; keep the one before it too (see `load_client_state`)."""
    from thinwire.runtime.rundir import atomic_write

    store.mkdir(parents=True, exist_ok=True)
    atomic_write(store / f"c{cid}-r{rnd}", state.encode())
    for old in sorted(_stored_rounds(store, cid))[:-2]:
        (store / f"c{cid}-r{old}").unlink(missing_ok=True)


def _stored_rounds(store: Path, cid: int) -> list[int]:
    if not store.is_dir():
        return []
    found = (re.fullmatch(rf"c{cid}-r(\d+)", p.name) for p in store.iterdir())
    return [int(m.group(1)) for m in found if m]


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
    context.state[STATE_CONFIG] = ConfigRecord({"config": text, "config-sha": digest,
                                                RUN_KEY: str(meta.get(RUN_KEY, digest[:20]))})
    host, _ = _host(context)
    claims = {PARTITION_ID: partition, FINGERPRINT: random_fingerprint(),
              BASE_DIGEST: host.client.ctx.workbench.base_digest}
    return Message(RecordDict({META: ConfigRecord(claims)}), reply_to=message)


@client_app.train("thinwire_fit")
def _fit(message: Message, context: Context) -> Message:
    """Decode the download, run the method's client side with this client's state, reply."""
    entered, age = time.perf_counter(), process_age()
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
    from thinwire.runtime.upload import client_report, client_upload, take_roster

    download = Payload.decode(unpack(message.content[PAYLOAD]))
    roster = take_roster(download)
    store = replica_root() / host.run_key / "states"
    state = load_client_state(store, cid, rnd)
    examples = host.examples_for(partition, str(context.node_config.get(DATA_PATH, "") or ""))
    upload = host.client.fit(rnd, cid, download, examples, state)
    secure = _secagg_state(context) if host.config.privacy.secagg else None
    up = client_upload(host.config, rnd, cid, upload.payload, state=state, secure=secure, roster=roster)
    if secure is not None:  # its round seed's share and the roster, for the unmask message
        context.state[STATE_SECAGG] = ConfigRecord({"state": secure.encode()})
    save_client_state(store, cid, rnd, state)
    num_examples, reported = client_report(host.config, upload)
    metrics = {k: v for k, v in reported.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    content = RecordDict({
        PAYLOAD: pack(up),
        META: ConfigRecord({"client": cid, "num-examples": int(num_examples), "setup-s": float(setup_s),
                            "import-s": float(import_s), "process-age-s": float(age)}),
        METRICS: MetricRecord(metrics),
    })
    return Message(content, reply_to=message)


@client_app.query("thinwire_secagg")
def _secagg(message: Message, context: Context) -> Message:
    """One SecAgg+ stage for this node's client; the protocol state stays in Context.state."""
    from thinwire.secagg import SecAggClient

    meta = message.content[META]
    rnd, cid, stage = int(meta["round"]), int(meta["client"]), str(meta["stage"])
    if cid != _partition(context):
        raise RuntimeError(f"thinwire: secagg message for client {cid} reached the node of partition "
                           f"{_partition(context)}")
    state = SecAggClient(cid) if stage == "setup" else _secagg_state(context)
    if state is None or (stage != "setup" and state.rnd != rnd):
        raise RuntimeError(f"thinwire: no secagg state for round {rnd} on this node")
    reply = state.step(stage, unpack(message.content[PAYLOAD]))
    context.state[STATE_SECAGG] = ConfigRecord({"state": state.encode()})
    return Message(RecordDict({PAYLOAD: pack(reply), META: ConfigRecord({"client": cid})}), reply_to=message)


def _secagg_state(context: Context) -> SecAggClient | None:
    from thinwire.secagg import SecAggClient

    saved = context.state.config_records.get(STATE_SECAGG)
    return None if saved is None else SecAggClient.decode(bytes(saved["state"]))


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
    from thinwire.runtime.flower_server import serve

    serve(grid, config, out, quiet=True, runtime="flower")


# --- simulation -----------------------------------------------------------------------------

def make_server_app(config: Config, out: Path, quiet: bool, result: dict[str, Any],
                    runtime: str = "flower-sim", resume: bool = False) -> ServerApp:
    """A ServerApp bound to one experiment (the simulation's); the summary lands in `result`."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        from thinwire.runtime.flower_server import serve

        result["run_id"] = grid.run.run_id
        result["summary"] = serve(grid, config, out, quiet=quiet, runtime=runtime, resume=resume)

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
                   client_app: ClientApp | None = None, resume: bool = False) -> dict[str, Any]:
    """`thinwire run --runtime flower-sim`: the experiment on Flower's simulation engine.

    Writes the same run directory as `run_local` and returns the summary; `resume=True`
    continues `<out>.partial` from its checkpoint. `num_cpus` bounds the concurrent clients
    (default: the machine's cores). `client_app` replaces this module's ClientApp (tests wrap it
    to inject failures). What the simulated nodes keep on disk (replicas, client states) lives in
    `<out>.partial/nodes` while the run is open, so a resumed run finds it.
    """
    from flwr.simulation import run_simulation

    from thinwire.methods import get_method

    out = Path(out)
    get_method(config.method.name)  # fail before Ray starts
    if out.exists():
        raise UsageError(f"output directory {out} already exists; pass a new --out or remove it")
    nodes = out.with_name(out.name + ".partial") / "nodes"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    previous_replicas = os.environ.get("THINWIRE_REPLICAS")
    os.environ["THINWIRE_REPLICAS"] = str(nodes.resolve())  # Ray workers inherit it
    flwr_logger = logging.getLogger("flwr")
    previous_level = flwr_logger.level
    flwr_logger.setLevel(logging.CRITICAL + 1 if quiet else logging.ERROR)
    result: dict[str, Any] = {}
    try:
        run_simulation(make_server_app(config, out, quiet, result, resume=resume), client_app or globals()["client_app"],
                       num_supernodes=config.federation.clients,
                       backend_config=simulation_backend(config, num_cpus))
    finally:
        flwr_logger.setLevel(previous_level)
        if previous_replicas is None:
            os.environ.pop("THINWIRE_REPLICAS", None)
        else:
            os.environ["THINWIRE_REPLICAS"] = previous_replicas
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without a summary; see the log above")
    shutil.rmtree(out / "nodes", ignore_errors=True)
    return result["summary"]
