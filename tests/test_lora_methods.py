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
    replies = [Reply(i, Payload(tensors={k: -t for k, t in b.items()}), n)
               for i, (b, n) in enumerate(zip(clients, examples))]
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
            up = Payload(tensors=b_zeros, scalars=stamp({}, r["round"], c["client"]))
            assert c["uplink_bytes"] == len(up.encode())


# --- Fed-SB --------------------------------------------------------------------------------------

SB = ["method.name='fed-sb'", "federation.max_examples=100"]


def _initialised_sb(smoke_config, *overrides):
    """A Fed-SB server after its init round (clients 0 and 1), and the client side; the init (the
    randomized SVD included) leaves the global RNG as it found it."""
    from thinwire.data import build_federation
    from thinwire.methods.base import ClientState

    rng = torch.get_rng_state()
    config = smoke_config(*SB, *overrides)
    ctx = RunContext(config, Workbench(config))
    spec = get_method("fed-sb")
    server, client = spec.server(ctx), spec.client(ctx)
    server.setup()
    data = build_federation(config).clients
    replies = []
    for cid in (0, 1):
        up = client.fit(1, cid, Payload.decode(server.download(1, cid).encode()), data[cid], ClientState())
        replies.append(Reply(cid, Payload.decode(up.payload.encode()), up.num_examples))
        server.validate(replies[-1])
    assert server.phase(1) == "init"
    server.aggregate(1, replies)
    assert torch.equal(torch.get_rng_state(), rng)
    return server, client, data, replies


def test_fed_sb_init_is_the_rank_r_svd_of_the_sign_step(smoke_config):
    """s·B·R0·A is the rank-r truncated SVD of ΔW1 = −lr·sign(Σ p_k G_k) (float64 reference), with
    orthonormal A rows and B columns; the init upload is each module's dense gradient."""
    server, _, _, replies = _initialised_sb(smoke_config)
    config = server.config
    p = [r.num_examples / sum(r.num_examples for r in replies) for r in replies]
    assert server.phase(1) == "init" and server.phase(2) == "train"
    for name, (rank, din, dout, scale) in server.shapes.items():
        gradient = sum(pk * r.payload.tensors[f"G/{name}"].double() for pk, r in zip(p, replies))
        assert gradient.shape == (dout, din)
        step = -config.train.lr * torch.sign(gradient)
        u, sigma, vh = torch.linalg.svd(step)
        best = u[:, :rank] @ torch.diag(sigma[:rank]) @ vh[:rank]
        a, b = server.factors[f"A/{name}"].double(), server.factors[f"B/{name}"].double()
        ours = scale * b @ server.weights[f"{name}.lora_A.default.R"].double() @ a
        eye = torch.eye(rank, dtype=torch.float64)
        assert torch.allclose(a @ a.T, eye, atol=1e-5) and torch.allclose(b.T @ b, eye, atol=1e-5)
        # randomized SVD (10 power iterations): within 1% of the optimal rank-r error and energy (a sign
        # matrix's spectrum is flat, so the subspace itself may differ from the exact one's)
        assert torch.linalg.norm(step - ours) <= 1.01 * torch.linalg.norm(step - best)
        assert torch.linalg.norm(ours) >= 0.99 * torch.linalg.norm(best)


def test_fed_sb_refuses_a_rank_its_svd_cannot_fill(smoke_config):
    from thinwire.errors import UsageError

    with pytest.raises(UsageError, match="lora_rank = 40 exceeds the rank of"):
        _server(smoke_config(*SB, "model.lora_rank=40"))  # k_proj and v_proj are 32x64


def test_fed_sb_sends_factors_once_then_only_r_and_averages_only_this_rounds_r(smoke_config):
    from thinwire.methods.base import ClientState

    server, client, data, _ = _initialised_sb(smoke_config)
    r_names = set(server.weights)
    factors = {k: t.clone() for k, t in server.factors.items()}
    first = server.download(2, 0)
    assert set(first.tensors) == r_names | set(factors)
    state = ClientState()
    up = client.fit(2, 0, Payload.decode(first.encode()), data[0], state)
    assert set(up.payload.tensors) == r_names  # never A or B
    assert all(t.shape == (8, 8) for t in up.payload.tensors.values())
    held = {k[len("factors/"):]: t for k, t in state.tensors.items()}
    assert held.keys() == factors.keys() and all(torch.equal(held[k], factors[k]) for k in factors)
    server.aggregate(2, [Reply(0, up.payload, up.num_examples)])
    assert set(server.download(3, 0).tensors) == r_names  # client 0 holds them now
    assert set(server.download(3, 2).tensors) == r_names | set(factors)  # client 2 does not
    # B·(Σ p_k R_k)·A == Σ p_k B·R_k·A for the round's uploads alone (float64 closed form)
    gen = torch.Generator().manual_seed(3)
    start = {k: t.clone() for k, t in server.weights.items()}
    ends = [{k: torch.randn(t.shape, generator=gen) for k, t in start.items()} for _ in range(3)]
    examples = [5, 15, 20]
    server.aggregate(3, [Reply(i, Payload(tensors={k: start[k] - e[k] for k in start}), n)
                         for i, (e, n) in enumerate(zip(ends, examples))])
    p = [n / sum(examples) for n in examples]
    for name, (_, _, _, scale) in server.shapes.items():
        a, b = factors[f"A/{name}"].double(), factors[f"B/{name}"].double()
        key = f"{name}.lora_A.default.R"
        expected = sum(pk * scale * b @ e[key].double() @ a for pk, e in zip(p, ends))
        got = scale * b @ server.weights[key].double() @ a
        assert torch.allclose(got, expected, rtol=0, atol=1e-6 * expected.abs().max())
        assert torch.equal(server.factors[f"A/{name}"], factors[f"A/{name}"])


def test_fed_sb_learns_counts_its_payloads_and_exports_its_model(tmp_path, smoke_config):
    from thinwire.export import export_run, load_for_generation

    config = smoke_config(*SB, "federation.rounds=4", "eval.generate=false")
    summary = run_local(config, tmp_path / "run", quiet=True)
    assert summary["final_eval"]["loss"] < summary["base_eval"]["loss"] - 0.1
    server = _server(config)
    grads = {f"G/{n}": torch.zeros(dout, din) for n, (_, din, dout, _) in server.shapes.items()}
    r_zeros = {f"{n}.lora_A.default.R": torch.zeros(r, r) for n, (r, _, _, _) in server.shapes.items()}
    factors = {**{f"A/{n}": torch.zeros(r, din) for n, (r, din, _, _) in server.shapes.items()},
               **{f"B/{n}": torch.zeros(dout, r) for n, (r, _, dout, _) in server.shapes.items()}}
    holders = set()
    rounds = _rounds(tmp_path / "run")
    assert [r["phase"] for r in rounds] == ["init", "train", "train", "train"]
    for r in rounds:
        for c in r["clients"]:
            scalars = stamp({}, r["round"], c["client"])
            if r["phase"] == "init":
                down, up = Payload(scalars={"phase": "init"}), Payload(tensors=grads, scalars=scalars)
            else:
                sent = r_zeros if c["client"] in holders else {**r_zeros, **factors}
                down, up = Payload(tensors=sent, scalars={"phase": "train"}), Payload(tensors=r_zeros, scalars=scalars)
            assert (c["downlink_bytes"], c["uplink_bytes"]) == (len(down.encode()), len(up.encode()))
        if r["phase"] == "train":
            holders |= {c["client"] for c in r["clients"]}
    assert summary["trainable_parameters"] == sum(t.numel() for t in r_zeros.values())
    # the export is a PEFT adapter that loads elsewhere and computes what the run's final state computes
    assert export_run(tmp_path / "run", tmp_path / "adapter") == "adapter"
    exported, tokenizer = load_for_generation(tmp_path / "adapter")
    run_model, _ = load_for_generation(tmp_path / "run")
    batch = tokenizer(["Reverse the word: hello"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(run_model(**batch).logits, exported(**batch).logits, atol=1e-5)


def test_fed_sb_final_state_is_a_plain_lora_adapter_computing_the_model(smoke_config):
    """final_state (lora_A = R·A, lora_B = B) in an ordinary PEFT LoRA gives the server's model."""
    from thinwire.methods.base import load_into

    server, _, _, _ = _initialised_sb(smoke_config)
    tokenizer = server.ctx.workbench.tokenizer
    batch = tokenizer(["Reverse the word: hello"], return_tensors="pt")
    plain = Workbench(server.config)
    model, params = plain.trainable(True)
    load_into(params, server.final_state().tensors)
    with torch.no_grad():
        ours, theirs = server.eval_model()(**batch).logits, model(**batch).logits
        base = plain.lora_model()
        with base.disable_adapter():
            untouched = base(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.allclose(ours, untouched, atol=1e-3)


# --- HetLoRA ------------------------------------------------------------------------------------

HET = ["method.name='hetlora'", "method.hetlora.ranks=[2, 4, 8]", "train.lr=5e-2"]


def test_hetlora_slices_exactly_and_a_client_trains_only_its_rank(first_upload, smoke_config):
    from thinwire.data import build_federation
    from thinwire.methods.base import ClientState

    server, upload, _ = first_upload(*HET)  # client 0: rank 2
    down = server.download(1, 0)
    assert down.scalars["rank"] == 2 and server.download(1, 4).scalars["rank"] == 4  # ranks repeat over clients
    for name, t in server.weights.items():
        assert t.shape[0 if ".lora_A." in name else 1] == 8  # the global adapter stays at r_max
        expected = t[:2] if ".lora_A." in name else t[:, :2]
        assert torch.equal(down.tensors[name], expected) and upload.tensors[name].shape == expected.shape
        assert not torch.equal(upload.tensors[name], expected)  # trained
    # what the client trained beyond its rank stayed zero in its (r_max) adapter
    client = get_method("hetlora").client(server.ctx)
    client.fit(1, 0, down, build_federation(server.config).clients[0], ClientState())
    _, params = server.ctx.workbench.trainable(True)
    for name, p in params.items():
        tail = p[2:] if ".lora_A." in name else p[:, 2:]
        assert torch.count_nonzero(tail) == 0


def test_hetlora_aggregate_is_norm_weighted_with_padding(smoke_config):
    """A^g = Σ w_k·padrows(A_k), B^g = Σ w_k·padcols(B_k), w_k = ‖B_k A_k‖_F / Σ_j ‖B_j A_j‖_F per
    module (float64 closed form); example counts do not enter."""
    server = _server(smoke_config(*HET))
    gen = torch.Generator().manual_seed(5)
    clients = {0: 2, 2: 8}  # client -> rank
    sent = {cid: {n: torch.randn(t[:r].shape if ".lora_A." in n else t[:, :r].shape, generator=gen)
                  for n, t in server.weights.items()} for cid, r in clients.items()}
    replies = [Reply(cid, Payload(tensors=f), n) for (cid, f), n in zip(sent.items(), (7, 70))]
    for reply in replies:
        server.validate(reply)
    server.aggregate(1, replies)
    for a_name in [n for n in server.weights if ".lora_A." in n]:
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        norms = [torch.linalg.norm(sent[c][b_name].double() @ sent[c][a_name].double()) for c in clients]
        w = [s / sum(norms) for s in norms]
        a_exp = torch.zeros(server.weights[a_name].shape, dtype=torch.float64)
        b_exp = torch.zeros(server.weights[b_name].shape, dtype=torch.float64)
        for wk, (c, r) in zip(w, clients.items()):
            a_exp[:r] += wk * sent[c][a_name].double()
            b_exp[:, :r] += wk * sent[c][b_name].double()
        assert torch.allclose(server.weights[a_name].double(), a_exp, atol=1e-6)
        assert torch.allclose(server.weights[b_name].double(), b_exp, atol=1e-6)


def test_hetlora_learns_and_counts_each_clients_rank(tmp_path, smoke_config):
    from thinwire.errors import UsageError
    from thinwire.methods.hetlora import slice_rank

    with pytest.raises(UsageError, match="ranks has rank 9"):
        _server(smoke_config(*HET, "method.hetlora.ranks=[9]"))
    with pytest.raises(UsageError, match="aggregates by its own rule"):
        _server(smoke_config(*FLORA, "method.aggregation='median'"))
    config = smoke_config(*HET, "federation.rounds=3", "eval.generate=false")
    summary = run_local(config, tmp_path / "run", quiet=True)
    assert summary["final_eval"]["loss"] < summary["base_eval"]["loss"] - 0.1
    zeros = {n: torch.zeros_like(t) for n, t in _server(config).weights.items()}
    for r in _rounds(tmp_path / "run"):
        for c in r["clients"]:
            rank = [2, 4, 8][c["client"] % 3]
            sent = slice_rank(zeros, rank)
            assert c["downlink_bytes"] == len(Payload(tensors=sent, scalars={"rank": rank}).encode())
            assert c["uplink_bytes"] == len(Payload(tensors=sent, scalars=stamp({}, r["round"], c["client"])).encode())


# --- FLoRA --------------------------------------------------------------------------------------

FLORA = ["method.name='flora'", "method.flora.ranks=[2, 4, 8]", "train.lr=5e-2", "federation.max_examples=100"]


def test_flora_merges_the_exact_weighted_sum_of_client_products(smoke_config):
    """W_{t+1} − W_t = s·B_st·A_st = s·Σ p_k·B_k·A_k (float64 closed form); the stack's rank is
    the participants' Σ r_k, and it is merged, not kept."""
    server = _server(smoke_config(*FLORA))
    before = {k: t.clone() for k, t in server.weights.items()}
    gen = torch.Generator().manual_seed(7)
    clients, examples = {0: 2, 2: 8}, (10, 30)
    from thinwire.methods.hetlora import slice_rank

    sent = {c: {n: torch.randn(t.shape, generator=gen) for n, t in slice_rank(server.adapter, r).items()}
            for c, r in clients.items()}
    replies = [Reply(c, Payload(tensors=f), n) for (c, f), n in zip(sent.items(), examples)]
    for reply in replies:
        server.validate(reply)
    metrics = server.aggregate(1, replies)
    assert metrics["stack_rank"] == 10 and server.trainable_parameters() == 7168
    p = [n / sum(examples) for n in examples]
    scale = server.config.model.lora_alpha / server.config.model.lora_rank
    for module in server.layers:
        a, b = f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"
        expected = sum(pk * scale * sent[c][b].double() @ sent[c][a].double() for pk, c in zip(p, clients))
        change = server.weights[f"W/{module}"].double() - before[f"W/{module}"].double()
        assert torch.allclose(change, expected, rtol=0, atol=1e-6 * expected.abs().max())


def test_flora_learns_counts_dense_downloads_and_exports_the_merged_model(tmp_path, smoke_config):
    """A client starts each round from the merged model (its fresh adapter adds nothing: B = 0);
    the final state is that model, and it exports as a plain Hugging Face model."""
    from thinwire.export import export_run, load_for_generation
    from thinwire.methods.base import load_into
    from thinwire.methods.hetlora import slice_rank

    config = smoke_config(*FLORA, "federation.rounds=3", "eval.generate=false")
    summary = run_local(config, tmp_path / "run", quiet=True)
    assert summary["final_eval"]["loss"] < summary["base_eval"]["loss"] - 0.1
    server = _server(config)
    dense = {n: torch.zeros(t.shape) for n, t in server.weights.items()}
    for r in _rounds(tmp_path / "run"):
        for c in r["clients"]:
            rank = [2, 4, 8][c["client"] % 3]
            up = Payload(tensors={n: torch.zeros(t.shape) for n, t in slice_rank(server.adapter, rank).items()},
                         scalars=stamp({}, r["round"], c["client"]))
            assert c["downlink_bytes"] == len(Payload(tensors=dense, scalars={"rank": rank}).encode())
            assert c["uplink_bytes"] == len(up.encode())
    assert export_run(tmp_path / "run", tmp_path / "model") == "model"
    exported, tokenizer = load_for_generation(tmp_path / "model")
    batch = tokenizer(["Reverse the word: hello"], return_tensors="pt")
    # the server's merged model (base layers W, adapter B = 0) is the plain model with final_state
    server.weights = {n: t + 0.01 for n, t in server.weights.items()}
    plain = Workbench(config)
    model, params = plain.trainable(False)
    load_into(params, server.final_state().tensors)
    with torch.no_grad():
        assert torch.allclose(server.eval_model()(**batch).logits, model(**batch).logits, atol=1e-5)
        run_model, _ = load_for_generation(tmp_path / "run")
        assert torch.allclose(run_model(**batch).logits, exported(**batch).logits, atol=1e-5)


# --- every method here: resume and runtime parity ------------------------------------------------

RUNS = {"ffa-lora": FFA, "fed-sb": SB, "hetlora": HET, "flora": FLORA}


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


# Fed-SB's phases and per-client factors run by default; the others are FedIT-shaped
# (a Ray start each, ~30 s) and run with -m slow.
@pytest.mark.parametrize("method", [pytest.param(m, marks=[pytest.mark.slow] if m != "fed-sb" else [])
                                    for m in sorted(RUNS)])
def test_flower_simulation_matches_the_local_runtime(tmp_path, smoke_config, method):
    from test_flower import assert_same_run

    from thinwire.runtime import flower

    config = smoke_config(*RUNS[method], "eval.generate=false")
    local = run_local(config, tmp_path / "local", quiet=True)
    sim = flower.run_flower_sim(config, tmp_path / "sim", quiet=True, num_cpus=1)
    assert sim["final_eval"] == local["final_eval"]
    assert_same_run(tmp_path / "local", tmp_path / "sim")
