"""The Flower runtime: simulation and a real loopback deployment reproduce the local runtime bit for
bit; failures cost a client's update, not the run; ReplicaClient survives fresh processes."""

import contextlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from flwr.clientapp import ClientApp

from conftest import crash_in_round
from thinwire.cli import main
from thinwire.errors import UsageError
from thinwire.fuzz import FUZZ_SETTINGS
from thinwire.methods import get_method
from thinwire.methods.base import RunContext, Upload, Workbench
from thinwire.methods.history import HistoryServer, ReplicaClient, UpdateRule
from thinwire.runtime import deploy, flower
from thinwire.runtime.engine import sample_clients
from thinwire.runtime.local import run_local
from thinwire.wire import Payload, PayloadError

FLOWER_ONLY_ROUND = {"time_s", "clients", "flower_downlink_bytes", "flower_uplink_bytes",
                     "flower_control_bytes"}
FLOWER_ONLY_SUMMARY = {"wall_s", "peak_rss_mb", "runtime", "flower_downlink_bytes_total",
                       "flower_uplink_bytes_total", "flower_control_bytes_total"}
REPO = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml's [tool.flwr.app]
CLIENT_TIMING = {"train_s", "node", "flower_downlink_bytes", "flower_uplink_bytes", "clientapp_age_s",
                 "import_s", "setup_s"}


def _rounds(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _strip_clients(rounds):
    """The rounds' client records without timings and Flower's extras (in the record or its metrics)."""
    def strip(record):
        return {k: strip(v) if k == "metrics" else v for k, v in record.items() if k not in CLIENT_TIMING}

    return [[strip(c) for c in r["clients"]] for r in rounds]


def assert_same_run(local, other, faults: bool = False):
    """Same weights (bytes), same metrics and traffic; only timings and Flower's extras differ
    (`faults`: the runs had failures, so Flower's framing is not compared with the payloads)."""
    assert (local / "final_state.safetensors").read_bytes() == (other / "final_state.safetensors").read_bytes()
    assert (local / "config.toml").read_text() == (other / "config.toml").read_text()
    assert (local / "predictions.jsonl").read_text() == (other / "predictions.jsonl").read_text()
    a, b = _rounds(local), _rounds(other)
    # `aggregate` metrics may differ in the last bits: Payload.decode returns tensors in
    # safetensors' hash order (random per call), and e.g. FedAvg's update_norm sums per-tensor
    # norms in that order. The weights themselves are per-tensor and compared exactly above.
    # Timings (`*_s`, e.g. FedPT's distillation seconds) differ; labels (CG-FedLLM's phase) must not.
    for ra, rb in zip(a, b):
        numbers = [{k: v for k, v in r["aggregate"].items() if isinstance(v, (int, float)) and not k.endswith("_s")}
                   for r in (ra, rb)]
        labels = [{k: v for k, v in r["aggregate"].items() if not isinstance(v, (int, float))} for r in (ra, rb)]
        assert numbers[1] == pytest.approx(numbers[0], rel=1e-6) and labels[1] == labels[0]
    skip = FLOWER_ONLY_ROUND | {"aggregate"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in a] == \
           [{k: v for k, v in r.items() if k not in skip} for r in b]
    assert _strip_clients(a) == _strip_clients(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (local, other))
    assert {k: v for k, v in sa.items() if k not in FLOWER_ONLY_SUMMARY} == \
           {k: v for k, v in sb.items() if k not in FLOWER_ONLY_SUMMARY}
    for r in b if not faults else ():
        assert r["failures"] == []
        # Flower's framing is visible and small next to the payload it carries
        assert 0 < r["flower_downlink_bytes"] - r["downlink_bytes"] < 2000 * r["clients_ok"]
        assert 0 < r["flower_uplink_bytes"] - r["uplink_bytes"] < 2000 * r["clients_ok"]


# Settings per run: CG-FedLLM runs a TGAP round, trains the AE on the server, sends it once per
# client and keeps error feedback in the client's state (with the sign codec, each upload's subset
# comes from the (round, client) seed on both sides); FedPT proxy-tunes and distils on the server
# (the tiny pair).
PARITY_RUNS = {
    "fedavg": ["method.name='fedavg'"], "fedit": ["method.name='fedit'"],
    "cgfedllm": ["method.name='cgfedllm'", "method.cgfedllm.tgap_rounds=1", "method.cgfedllm.width=4",
                 "method.cgfedllm.res_blocks=1", "method.cgfedllm.ae_steps=20", "method.cgfedllm.ae_batch=4",
                 "method.cgfedllm.tgap_snapshots=2"],
    "cgfedllm-signs": ["method.name='cgfedllm'", "method.cgfedllm.tgap_rounds=1", "method.cgfedllm.codec='signs'"],
    "fedpt": ["method.name='fedpt'", "model.name='tiny-small'", "method.fedpt.large='tiny'",
              "method.fedpt.kd_examples=4", "method.fedpt.kd_max_new_tokens=4", "method.fedpt.kd_steps=2",
              "eval.max_examples=4"],
}


@pytest.mark.parametrize("run", sorted(PARITY_RUNS))
def test_simulation_matches_local(tmp_path, smoke_config, run):
    config = smoke_config("eval.generate=false", *PARITY_RUNS[run])
    local = run_local(config, tmp_path / "local", quiet=True)
    sim = flower.run_flower_sim(config, tmp_path / "sim", quiet=True, num_cpus=1)
    assert sim["runtime"] == "flower-sim" and sim["final_eval"] == local["final_eval"]
    assert_same_run(tmp_path / "local", tmp_path / "sim")


def test_simulated_faults_and_retries_hit_the_same_clients_as_on_the_local_runtime(tmp_path, smoke_config):
    """One round engine: the failure and straggler draws, the retries and the too-few rule are the
    engine's, so flower-sim knocks out the same clients in the same rounds as the local runtime."""
    # seed 2: rounds 1 and 4 succeed on their retry, rounds 2 and 3 are skipped after theirs
    config = smoke_config("eval.generate=false", "federation.rounds=4", "federation.seed=2",
                          "federation.failure_rate=0.5", "federation.straggler_rate=0.2",
                          "federation.clients_per_round=3", "federation.min_replies=2",
                          "federation.on_too_few='retry'", "federation.max_retries=1")
    run_local(config, tmp_path / "local", quiet=True)
    flower.run_flower_sim(config, tmp_path / "sim", quiet=True, num_cpus=1)
    assert_same_run(tmp_path / "local", tmp_path / "sim", faults=True)
    local, sim = _rounds(tmp_path / "local"), _rounds(tmp_path / "sim")
    assert [r["failures"] for r in sim] == [r["failures"] for r in local]
    assert [(r["retries"], r["skipped"], r["clients_ok"]) for r in sim] == [(1, False, 2), (1, True, 0),
                                                                            (1, True, 0), (1, False, 2)]
    reasons = {f["reason"].split(" (")[0] for r in sim for f in r["failures"]}
    assert {"simulated failure", "reply discarded: 1 of the 2 replies the round needs"} <= reasons


@pytest.mark.slow
@pytest.mark.parametrize("run", ["cgfedllm", "fedkseed"])
def test_a_killed_simulation_resumes_to_the_same_final_state(tmp_path, smoke_config, monkeypatch, run):
    """The ServerApp dies in round 3 after the round-2 checkpoint; `--resume` on flower-sim starts
    fresh nodes, which find their client states (CG-FedLLM's error feedback) and replicas
    (FedKSeed) as of round 2 under `<out>.partial/nodes`, and the run ends where an uninterrupted
    one does."""
    runs = {"cgfedllm": [*PARITY_RUNS["cgfedllm"], "method.cgfedllm.codec='signs'"],
            "fedkseed": ["method.name='fedkseed'", "method.fedkseed.local_steps=8", "method.fedkseed.pool_size=64"]}
    config = smoke_config("eval.generate=false", "federation.rounds=4", *runs[run])
    run_local(config, tmp_path / "whole", quiet=True)
    restore = crash_in_round(monkeypatch, config.method.name, 3, KeyboardInterrupt("the server machine went down"))
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        flower.run_flower_sim(config, tmp_path / "cut", quiet=True, num_cpus=1)
    partial = tmp_path / "cut.partial"
    assert json.loads((partial / "checkpoint" / "state.json").read_text())["round"] == 2
    assert any((partial / "nodes").rglob("*"))  # what the nodes kept survives the run
    restore()
    assert main(["run", "--resume", str(partial), "--runtime", "flower-sim", "--quiet"]) == 0
    assert not partial.exists() and not (tmp_path / "cut" / "nodes").exists()
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_simulation_with_replica_clients_on_two_actors(tmp_path, smoke_config):
    """FedKSeed clients rebuild the model from per-round updates; with two Ray actors each actor
    keeps its own replica (and the run's disk replica), and the result still equals the local run."""
    config = smoke_config("method.name='fedkseed'", "eval.generate=false", "federation.rounds=4",
                          "method.fedkseed.local_steps=8", "method.fedkseed.pool_size=64")
    run_local(config, tmp_path / "local", quiet=True)
    flower.run_flower_sim(config, tmp_path / "sim", quiet=True, num_cpus=2)
    assert_same_run(tmp_path / "local", tmp_path / "sim")


def with_nan(payload: Payload) -> Payload:
    """`payload` with a NaN in its first non-empty floating tensor."""
    tensors = {k: v.clone() for k, v in payload.tensors.items()}
    name = next(k for k in sorted(tensors) if tensors[k].is_floating_point() and tensors[k].numel())
    tensors[name].view(-1)[0] = float("nan")
    return Payload(tensors=tensors, scalars=dict(payload.scalars))


def _faulty_client_app(bad_client: int, bad_round: int, fault: str) -> ClientApp:
    """thinwire's ClientApp, except that one client in one round raises (fault "raise") or uploads
    a NaN (fault "nan"); defined in a function so Ray ships it to its actors by value."""
    app = ClientApp()

    @app.query("thinwire_hello")
    def hello(message, context):
        return flower._hello(message, context)

    @app.train("thinwire_fit")
    def fit(message, context):
        meta = message.content["thinwire"]
        bad = int(meta["client"]) == bad_client and int(meta["round"]) == bad_round
        if bad and fault == "raise":
            raise RuntimeError(f"disk full on client {bad_client}")
        reply = flower._fit(message, context)
        if bad and fault == "nan":
            payload = Payload.decode(flower.unpack(reply.content[flower.PAYLOAD]))
            reply.content[flower.PAYLOAD] = flower.pack(with_nan(payload).encode())
        if bad and fault == "deep-nesting":  # a header the JSON parser cannot recurse through
            reply.content[flower.PAYLOAD] = flower.pack(struct.pack("<Q", 100_000) + b"[" * 100_000)
        if bad and fault == "huge-example-count":
            reply.content["thinwire"]["num-examples"] = 10 ** 12
        return reply

    return app


def test_client_failure_costs_its_update_not_the_run(tmp_path, smoke_config, monkeypatch):
    """A client that raises costs its update; its download counts. (And a warning the server side
    raises in setup lands in round 1's record.)"""
    from thinwire.methods.fedavg import DeltaServer

    setup = DeltaServer.setup
    monkeypatch.setattr(DeltaServer, "setup", lambda self: (self.ctx.warn("from setup"), setup(self))[1])
    config = smoke_config("eval.generate=false", "federation.on_too_few='retry'")
    bad = sample_clients(config, 1)[-1]
    summary = flower.run_flower_sim(config, tmp_path / "run", quiet=True, num_cpus=1,
                                    client_app=_faulty_client_app(bad, 1, "raise"))
    first, second = _rounds(tmp_path / "run")
    assert first["clients_sampled"] == 2 and first["clients_ok"] == 1
    assert [c["client"] for c in first["clients"]] == [c for c in sample_clients(config, 1) if c != bad]
    # the failed client's download crossed the wire and counts; it sent nothing back
    (ok,) = first["clients"]
    assert first["failures"] == [{"client": bad, "downlink_bytes": ok["downlink_bytes"],
                                  "reason": first["failures"][0]["reason"]}]
    assert f"RuntimeError: disk full on client {bad}" in first["failures"][0]["reason"]
    assert first["uplink_bytes"] == first["uplink_bytes_accepted"] == ok["uplink_bytes"]
    assert first["downlink_bytes"] == 2 * ok["downlink_bytes"] == 2 * first["downlink_bytes_accepted"]
    assert first["clients_contacted"] == 2 and summary["client_rounds"] == 4
    assert summary["downlink_bytes_total"] == sum(r["downlink_bytes"] for r in (first, second))
    assert second["clients_ok"] == 2 and second["failures"] == []
    assert (first["warnings"], second["warnings"]) == (["from setup"], [])
    assert summary["failures_total"] == 1 and summary["rounds"] == 2
    assert (tmp_path / "run" / "final_state.safetensors").exists()


@pytest.mark.parametrize("fault, reason", [
    ("nan", "non-finite"),
    pytest.param("deep-nesting", "RecursionError", marks=pytest.mark.slow),
    pytest.param("huge-example-count", "exceeds the", marks=pytest.mark.slow),
])
def test_a_poisoned_update_is_rejected_as_if_it_never_came(tmp_path, smoke_config, monkeypatch, fault, reason):
    """The Flower server screens uploads as the local runtime does: a hostile update is rejected,
    and the run ends bit-identical to a local run in which that client was down for that round."""
    config = smoke_config("eval.generate=false")
    bad = sample_clients(config, 1)[-1]
    flower.run_flower_sim(config, tmp_path / "sim", quiet=True, num_cpus=1,
                          client_app=_faulty_client_app(bad, 1, fault))
    first = _rounds(tmp_path / "sim")[0]
    assert [r["client"] for r in first["rejected"]] == [bad] and reason in first["rejected"][0]["reason"]
    assert first["clients_ok"] == 1 and first["failures"] == [] and first["skipped"] is False
    # the rejected upload and its download count, whatever its length
    (ok,) = first["clients"]
    assert first["rejected"][0]["downlink_bytes"] == ok["downlink_bytes"]
    assert first["uplink_bytes"] == ok["uplink_bytes"] + first["rejected"][0]["uplink_bytes"]
    assert first["uplink_bytes_accepted"] == ok["uplink_bytes"]

    client = get_method(config.method.name).client
    fit = client.fit

    def down_in_round_1(self, rnd, cid, *args):
        if rnd == 1 and cid == bad:
            raise RuntimeError("down")
        return fit(self, rnd, cid, *args)

    monkeypatch.setattr(client, "fit", down_in_round_1)
    run_local(config, tmp_path / "local", quiet=True)
    assert (tmp_path / "sim/final_state.safetensors").read_bytes() == \
        (tmp_path / "local/final_state.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(FUZZ_SETTINGS))
def test_every_method_rejects_a_poisoned_upload_on_flower_sim_as_locally(tmp_path, smoke_config, monkeypatch,
                                                                         method):
    """The attack suite's NaN upload, for every method, on flower-sim: rejected and logged, and the
    run is bit-identical to the local run with the same hostile client (which tests/test_attacks.py
    shows equal to the run where that client was down)."""
    config = smoke_config(*FUZZ_SETTINGS[method], "eval.generate=false",
                          f"federation.rounds={2 if method == 'cgfedllm' else 1}")
    bad = sample_clients(config, 1)[-1]
    flower.run_flower_sim(config, tmp_path / "sim", quiet=True, num_cpus=1,
                          client_app=_faulty_client_app(bad, 1, "nan"))
    client = get_method(config.method.name).client
    fit = client.fit

    def hostile(self, rnd, cid, *args):
        upload = fit(self, rnd, cid, *args)
        if (rnd, cid) == (1, bad):
            upload.payload = with_nan(upload.payload)
        return upload

    monkeypatch.setattr(client, "fit", hostile)
    run_local(config, tmp_path / "local", quiet=True)
    sim, local = _rounds(tmp_path / "sim"), _rounds(tmp_path / "local")
    assert [r["client"] for r in sim[0]["rejected"]] == [bad] and "non-finite" in sim[0]["rejected"][0]["reason"]
    assert [r["rejected"] for r in sim] == [r["rejected"] for r in local]
    assert (tmp_path / "sim/final_state.safetensors").read_bytes() == \
        (tmp_path / "local/final_state.safetensors").read_bytes()


def test_existing_output_is_refused_before_ray_starts(tmp_path, smoke_config):
    (tmp_path / "run").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        flower.run_flower_sim(smoke_config(), tmp_path / "run", quiet=True)


# --- a real deployment on loopback ------------------------------------------------------------

@contextlib.contextmanager
def _loopback(tmp_path, node_env=lambda i: {}):
    """A SuperLink and three SuperNodes on 127.0.0.1 (insecure), stopped by PID afterwards;
    `node_env(i)` adds to SuperNode i's environment."""
    home, logs = tmp_path / "flwr-home", tmp_path / "logs"
    logs.mkdir()
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
           "THINWIRE_REPLICAS": str(tmp_path / "replicas")}
    port = deploy.free_port()
    processes = []
    try:
        link = deploy.start_superlink(port=port, flwr_home=home, insecure=True, log=logs / "superlink.log",
                                      cwd=tmp_path, env=env)
        processes.append(link)
        deploy.wait_for_port("127.0.0.1", port, timeout=60, process=link)
        for i in range(3):
            processes.append(deploy.start_supernode(
                f"127.0.0.1:{port}", i, 3, port=deploy.free_port(), flwr_home=home, insecure=True,
                log=logs / f"supernode{i}.log", cwd=tmp_path, env={**env, **node_env(i)}))
        deploy.write_connection("loopback", f"127.0.0.1:{port}", flwr_home=home, insecure=True)
        yield home, logs
    finally:
        deploy.stop(*processes)


@pytest.fixture
def loopback_federation(tmp_path):
    with _loopback(tmp_path) as federation:
        yield federation


def test_deployment_on_loopback_matches_local(tmp_path, smoke_config, loopback_federation):
    home, logs = loopback_federation
    # one round keeps this under a minute on 2 cores: every message costs a fresh ClientApp process
    # (~2 s start + ~4-6 s imports) plus Flower's polling; two rounds take ~11 s more
    overrides = ["eval.generate=false", "federation.rounds=1"]
    result = deploy.submit(REPO, "loopback",
                           {"config": "smoke.toml", "set": ";".join(overrides), "out": str(tmp_path / "deployed")},
                           flwr_home=home, timeout=240)
    if not (tmp_path / "deployed").is_dir():
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))
        pytest.fail(f"flwr run exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{tails}")
    run_local(smoke_config(*overrides), tmp_path / "local", quiet=True)
    assert_same_run(tmp_path / "local", tmp_path / "deployed")
    summary = json.loads((tmp_path / "deployed" / "summary.json").read_text())
    assert summary["runtime"] == "flower"
    clients = [c for r in _rounds(tmp_path / "deployed") for c in r["clients"]]
    assert len({c["node"] for c in clients}) == len({c["client"] for c in clients})  # one node per client


@pytest.mark.slow
def test_secure_aggregation_on_loopback_matches_local(tmp_path, smoke_config, loopback_federation):
    """SecAgg+ across real processes: keys, shares and masks travel as Flower messages, each node
    keeps its protocol state in Context.state, and the unmasked mean is the local runtime's."""
    home, logs = loopback_federation
    overrides = ["eval.generate=false", "federation.rounds=1", "method.name='ferret'", "privacy.secagg=true"]
    result = deploy.submit(REPO, "loopback",
                           {"config": "smoke.toml", "set": ";".join(overrides), "out": str(tmp_path / "deployed")},
                           flwr_home=home, timeout=400)
    if not (tmp_path / "deployed").is_dir():
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))
        pytest.fail(f"flwr run exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{tails}")
    run_local(smoke_config(*overrides), tmp_path / "local", quiet=True)
    assert (tmp_path / "local" / "final_state.safetensors").read_bytes() == \
           (tmp_path / "deployed" / "final_state.safetensors").read_bytes()
    (record,) = _rounds(tmp_path / "deployed")
    assert record["aggregate"]["secagg_unmasked"] == 2 and record["failures"] == []


# --- pieces -----------------------------------------------------------------------------------

def test_run_config_names_the_experiment(tmp_path):
    config, out = flower.config_from_run_config(
        {"config": "smoke.toml", "set": "method.name='fedit'; federation.rounds=3\neval.generate=false",
         "out": str(tmp_path / "x")})
    assert (config.method.name, config.federation.rounds, config.eval.generate) == ("fedit", 3, False)
    assert out == tmp_path / "x"
    with pytest.raises(UsageError, match="does not exist"):
        flower.config_from_run_config({"config": "nope.toml"})


def test_payload_travels_untouched_in_an_array_record():
    data = Payload(tensors={"w": torch.arange(6.0).view(2, 3)}, scalars={"n": 3}).encode()
    record = flower.pack(data)
    assert flower.unpack(record) == data
    with pytest.raises(ValueError, match="thinwire payload"):
        flower.unpack(type(record)())


def test_deploy_commands():
    link = deploy.superlink_command(port=9000, insecure=True)
    assert "--insecure" in link and "--disable-runtime-dependency-installation" in link
    with pytest.raises(UsageError, match="TLS"):
        deploy.superlink_command()
    with pytest.raises(UsageError, match="needs TLS"):
        deploy.superlink_command(insecure=True, node_auth=True)
    node = deploy.supernode_command("link.example:8000", 1, 4, root_certificates="ca.crt", auth_key="node")
    assert node[node.index("--node-config") + 1] == "partition-id=1 num-partitions=4"
    assert node[node.index("--root-certificates") + 1] == "ca.crt"
    assert node[node.index("--auth-supernode-private-key") + 1] == "node"
    with pytest.raises(UsageError, match="partition-id 4"):
        deploy.node_config(4, 4)


def test_certificates_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    certs = deploy.make_certificates(tmp_path / "certs", hosts=["link.example", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"link.example", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    private, public = deploy.make_node_key(tmp_path / "keys", "hospital-a")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert key.public_key().public_numbers() == load_ssh_public_key(public.read_bytes()).public_numbers()
    text = deploy.write_connection("prod", "link.example:8000", flwr_home=tmp_path / "home",
                                   root_certificates=str(certs.ca)).read_text()
    assert '[superlink.prod]' in text and 'default = "prod"' in text and str(certs.ca) in text


# --- ReplicaClient across fresh processes -----------------------------------------------------

class _ScaleRule(UpdateRule):
    """A deterministic toy update: every weight w <- w * (1 - s) + s * sin(version)."""

    def apply_update(self, weights, update, version):
        s = update.tensors["s"]
        for w in weights.values():
            w.mul_(1 - s).add_(s * torch.sin(torch.tensor(float(version))))


class _ToyServer(_ScaleRule, HistoryServer):
    def combine(self, rnd, replies):
        return Payload(tensors={"s": torch.tensor(sum(float(r.payload.tensors["g"]) for r in replies) / 100)}), {}


class _ToyClient(_ScaleRule, ReplicaClient):
    def train_and_encode(self, model, params, rnd, client_id, examples):
        self.seen = {n: p.detach().clone() for n, p in params.items()}
        return Upload(Payload(tensors={"g": torch.tensor(float(rnd + client_id))}), 1)


@pytest.mark.parametrize("layout", ["shared", "per-client"])
def test_replica_survives_a_fresh_process_per_message(tmp_path, smoke_config, layout):
    """Each fit runs in a 'fresh process' (new workbench, new client object); the disk replica lets
    every client rebuild the server's exact model, including after rounds it missed."""
    from thinwire.methods.base import ClientState, Reply

    config = smoke_config()
    server = _ToyServer(RunContext(config, Workbench(config)))
    server.setup()
    schedule = {1: [0, 1], 2: [0], 3: [1], 4: [0, 1], 5: [1]}  # client 0 misses round 3, client 1 round 2
    states = {0: ClientState(), 1: ClientState()}
    for rnd, clients in schedule.items():
        replies = []
        for cid in clients:
            client = _ToyClient(RunContext(config, Workbench(config)))
            client.replica_dir = tmp_path / ("shared" if layout == "shared" else f"client{cid}")
            upload = client.fit(rnd, cid, Payload.decode(server.download(rnd, cid).encode()), [], states[cid])
            for name, w in server.weights.items():
                assert torch.equal(client.seen[name], w), (rnd, cid, name)
            replies.append(Reply(cid, Payload.decode(upload.payload.encode()), 1))
        server.aggregate(rnd, replies)
    stored = sorted(p.name for p in tmp_path.rglob("v*.safetensors"))
    assert stored == (["v4.safetensors"] if layout == "shared" else ["v3.safetensors", "v4.safetensors"])

    # without the disk replica a fresh process cannot catch up from a partial download
    lost = _ToyClient(RunContext(config, Workbench(config)))
    with pytest.raises(PayloadError, match="replica is at version 0"):
        lost.fit(6, 1, Payload.decode(server.download(6, 1).encode()), [], ClientState())


@pytest.mark.slow
def test_a_node_that_draws_other_random_bits_is_refused(tmp_path):
    """A SuperNode whose torch kernels draw other bits (ATen's DEFAULT capability, against the
    server's vectorised one) would rebuild a drifting replica: the handshake refuses it, says so,
    and the run goes on without that partition."""
    import subprocess
    import sys

    probe = "from thinwire.seeding import random_fingerprint as f; print(f())"
    prints = {cap: subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                  env={**os.environ, "ATEN_CPU_CAPABILITY": cap}).stdout for cap in ("default", "")}
    if prints["default"] == prints[""]:
        pytest.skip("this machine's torch draws the same bits with and without vectorised kernels")
    with _loopback(tmp_path, lambda i: {"ATEN_CPU_CAPABILITY": "default"} if i == 2 else {}) as (home, _):
        overrides = ["eval.generate=false", "federation.rounds=1", "method.name='ferret'",
                     "federation.clients_per_round=3", "federation.round_timeout_s=20"]
        deploy.submit(REPO, "loopback", {"config": "smoke.toml", "set": ";".join(overrides),
                                         "out": str(tmp_path / "deployed")}, flwr_home=home, timeout=240)
    (first,) = _rounds(tmp_path / "deployed")
    # tiny's weights are drawn from the seed too, so that node's base model differs as well
    refused = [w for w in first["warnings"] if "partition 2 was refused" in w]
    assert refused and ("other random bits" in refused[0] or "base model's weights differ" in refused[0]), first["warnings"]
    assert sorted(c["client"] for c in first["clients"]) == [0, 1]
    assert [f["client"] for f in first["failures"]] == [2]


def _impostor_client_app(liar: int, claims: int) -> ClientApp:
    """thinwire's ClientApp, except that the node of partition `liar` says it owns `claims`."""
    app = ClientApp()

    @app.query("thinwire_hello")
    def hello(message, context):
        reply = flower._hello(message, context)
        if int(reply.content["thinwire"]["partition-id"]) == liar:
            reply.content["thinwire"]["partition-id"] = claims
        return reply

    @app.train("thinwire_fit")
    def fit(message, context):
        return flower._fit(message, context)

    return app


@pytest.mark.slow
def test_two_nodes_claiming_one_partition_cannot_both_serve_it(tmp_path, smoke_config):
    """One node per partition: the second claim is refused with a warning, and the run goes on
    (the impostor's own partition has no node; if its claim came first, partition 0's messages
    reach a node that refuses them, so that client fails too)."""
    config = smoke_config("eval.generate=false", "federation.rounds=2", "federation.clients_per_round=3",
                          "federation.round_timeout_s=20")  # a refused node must not cost the default 600 s
    flower.run_flower_sim(config, tmp_path / "run", quiet=True, num_cpus=1, client_app=_impostor_client_app(1, 0))
    first, second = _rounds(tmp_path / "run")
    assert any("both claim partition 0" in w for w in first["warnings"]), first["warnings"]
    for record in (first, second):
        assert [f["client"] for f in record["failures"]] in ([1], [0, 1])  # whichever claim came first
        assert [c["client"] for c in record["clients"]] in ([0, 2], [2])


def test_the_handshake_refuses_other_base_weights_or_other_random_draws(smoke_config):
    from thinwire.methods.base import Workbench
    from thinwire.runtime.flower_server import BASE_DIGEST, FINGERPRINT, refusal
    from thinwire.seeding import random_fingerprint

    ours = Workbench(smoke_config()).base_digest
    other = Workbench(smoke_config("federation.seed=1")).base_digest  # the tiny model is built from the seed
    assert ours == Workbench(smoke_config()).base_digest != other
    expected = {BASE_DIGEST: ours, FINGERPRINT: random_fingerprint()}
    assert refusal(dict(expected), expected) is None
    assert "base model's weights differ" in refusal({**expected, BASE_DIGEST: other}, expected)
    assert "other random bits" in refusal({**expected, FINGERPRINT: "0" * 64}, expected)
    assert refusal({BASE_DIGEST: ours}, {BASE_DIGEST: ours}) is None  # no shared draws: no fingerprint asked
