"""The newer federated LoRA methods (ALGORITHMS.md §7): FFA-LoRA and Fed-SB. Closed forms are
checked in float64; whole runs on the smoke config learn, count exactly the bytes of their
payloads, resume bit for bit and give the same final state on both runtimes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import crash_in_round
from thinwire.methods import get_method
from thinwire.methods.base import Reply, RunContext, Workbench
from thinwire.models.lora import lora_layers
from thinwire.runtime.local import resume_local, run_local
from thinwire.runtime.upload import stamp
from thinwire.seeding import derive_seed, torch_generator
from thinwire.wire import Payload

FFA = ["method.name='ffa-lora'", "train.lr=5e-2", "federation.max_examples=100"]


def _rounds(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _server(config):
    server = get_method(config.method.name).server(RunContext(config, Workbench(config)))
    server.setup()
    return server


def _expected_a(config) -> dict[str, torch.Tensor]:
    """A0 per module as §7.1 specifies it, drawn here independently: U(±1/√din) from (seed, module)."""
    seed = derive_seed(config.federation.seed, "ffa-lora")
    out = {}
    for name, layer in lora_layers(Workbench(config).lora_model()).items():
        shape = layer.lora_A["default"].weight.shape
        bound = 1.0 / shape[1] ** 0.5
        draw = torch.empty(shape).uniform_(-bound, bound, generator=torch_generator(seed, "ffa-lora-A", name))
        out[f"{name}.lora_A.default.weight"] = draw
    return out


# --- FFA-LoRA ------------------------------------------------------------------------------------


def test_ffa_lora_sends_only_b_both_ways(first_upload):
    server, upload, _ = first_upload(*FFA)
    down = server.download(1, 0)
    layers = lora_layers(server.ctx.workbench.lora_model())
    expected = {f"{name}.lora_B.default.weight" for name in layers}
    assert set(upload.tensors) == set(down.tensors) == expected
    assert all(upload.tensors[f"{n}.lora_B.default.weight"].shape == (layer.out_features, 8)
               for n, layer in layers.items())
    assert server.trainable_parameters() == sum(8 * layer.out_features for layer in layers.values())


def test_ffa_lora_aggregate_is_the_exact_weighted_mean_of_client_products(smoke_config):
    """B ← Σ p_k·B_k, so s·B·A0 = Σ p_k·s·B_k·A0 (float64 closed form), with p_k ∝ examples."""
    config = smoke_config(*FFA)
    server = _server(config)
    a0 = server.final_state().tensors
    gen = torch.Generator().manual_seed(1)
    clients = [{k: torch.randn(t.shape, generator=gen) for k, t in server.weights.items()} for _ in range(3)]
    examples = [10, 30, 20]
    # a client that ends at B_k uploads B_start − B_k, with B_start = 0
    replies = [Reply(i, Payload(tensors={k: -t for k, t in b.items()}), n) for i, (b, n) in enumerate(zip(clients, examples))]
    server.aggregate(1, replies)
    p = [n / sum(examples) for n in examples]
    scale = config.model.lora_alpha / config.model.lora_rank
    for name in server.weights:
        a_name = name.replace("lora_B", "lora_A")
        expected = sum(pk * scale * b[name].double() @ a0[a_name].double() for pk, b in zip(p, clients))
        got = scale * server.weights[name].double() @ a0[a_name].double()
        assert torch.allclose(got, expected, rtol=0, atol=1e-6 * expected.abs().max())


def test_ffa_lora_learns_counts_its_payloads_and_never_moves_a(tmp_path, smoke_config):
    config = smoke_config(*FFA, "federation.rounds=3", "eval.generate=false")
    summary = run_local(config, tmp_path / "run", quiet=True)
    assert summary["final_eval"]["loss"] < summary["base_eval"]["loss"] - 0.1
    final = load_file(str(tmp_path / "run" / "final_state.safetensors"))
    expected_a = _expected_a(config)
    for name, a in expected_a.items():  # A after three rounds is its seeded draw, bit for bit
        assert torch.equal(final[name], a)
    b_zeros = {k: torch.zeros_like(t) for k, t in final.items() if "lora_B" in k}
    assert len(b_zeros) == len(expected_a) and set(final) == set(b_zeros) | set(expected_a)
    down = len(Payload(tensors=b_zeros).encode())
    for r in _rounds(tmp_path / "run"):
        for c in r["clients"]:
            assert c["downlink_bytes"] == down
            assert c["uplink_bytes"] == len(Payload(tensors=b_zeros, scalars=stamp({}, r["round"], c["client"])).encode())


# --- every method here: resume and runtime parity ------------------------------------------------

RUNS = {"ffa-lora": FFA}


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", sorted(RUNS))
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, smoke_config, monkeypatch, method):
    from test_reliability import assert_same_run

    config = smoke_config(*RUNS[method], "federation.rounds=4", "eval.generate=false")
    run_local(config, tmp_path / "whole", quiet=True)
    restore = crash_in_round(monkeypatch, method, 3, Crash("power cut"))
    with pytest.raises(Crash):
        run_local(config, tmp_path / "cut", quiet=True)
    assert json.loads((tmp_path / "cut.partial" / "checkpoint" / "state.json").read_text())["round"] == 2
    restore()
    resume_local(tmp_path / "cut.partial", quiet=True)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


@pytest.mark.parametrize("method", sorted(RUNS))
def test_flower_simulation_matches_the_local_runtime(tmp_path, smoke_config, method):
    from test_flower import assert_same_run

    from thinwire.runtime import flower

    config = smoke_config(*RUNS[method], "eval.generate=false")
    local = run_local(config, tmp_path / "local", quiet=True)
    sim = flower.run_flower_sim(config, tmp_path / "sim", quiet=True, num_cpus=1)
    assert sim["final_eval"] == local["final_eval"]
    assert_same_run(tmp_path / "local", tmp_path / "sim")
