"""Zeroth-order core: exact perturbation, reproducible directions, deterministic rebuild, Pro."""

from __future__ import annotations

import copy
import hashlib
import math
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from thinwire.train.zeroth_order import (
    BLOCK,
    SeedHistory,
    SeedPool,
    apply_seed_scalars,
    direction,
    pro_probabilities,
    sample_seed_index,
    zo_estimate,
    zo_parameters,
    zo_train,
)

CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops on a shared 2-core box are far faster without intra-op threads.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(seed: int = 0) -> LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


def batch(seed: int = 1, n: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def test_params_are_unique_and_tied_once():
    model = tiny()
    params = zo_parameters(model)
    assert len({id(p) for p in params}) == len(params)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p is model.lm_head.weight for p in params) == 1


def test_seed_pool_is_pure_and_pinned():
    pool = SeedPool(4096, base_seed=7)
    seeds = [pool.seed(k) for k in range(4096)]
    assert len(set(seeds)) == 4096
    # Pins the definition: pure-Python splitmix64, no dependence on hash() salt or torch.
    assert SeedPool(8, 0).seed(0) == 0xA706DD2F4D197E6F
    with pytest.raises(IndexError):
        pool.seed(4096)


def test_estimate_equals_hand_built_perturbation_exactly():
    model, b, eps, seed = tiny(), batch(), 1e-3, 777
    params = zo_parameters(model)
    est = zo_estimate(model, params, seed, eps, b, threads=2)
    # Hand-built: explicit copies w +- eps*z with the same float32 op, in a separate model.
    other = copy.deepcopy(model)
    w0 = snapshot(params)
    losses = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for i, p in enumerate(zo_parameters(other)):
                p.copy_(torch.add(w0[i], direction(seed, i, p.shape), alpha=sign * eps))
            losses.append(float(other(**b).loss))
    assert (est.loss_plus, est.loss_minus) == tuple(losses)
    assert est.g == (losses[0] - losses[1]) / (2 * eps)


def test_estimate_matches_float64_finite_difference_and_gradient():
    model, b, eps, seed = tiny(), batch(), 1e-3, 31
    params = zo_parameters(model)
    est = zo_estimate(model, params, seed, eps, b)
    ref = copy.deepcopy(model).double()
    rparams = zo_parameters(ref)
    w0 = [p.detach().clone() for p in rparams]
    zs = [direction(seed, i, p.shape).double() for i, p in enumerate(rparams)]

    ids = b["input_ids"]

    def loss64() -> torch.Tensor:
        # Cross-entropy by hand in float64: HF's loss casts logits to float32 first.
        logits = ref(input_ids=ids).logits.double()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))

    def fd64(h: float) -> float:
        losses = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                for p, w, z in zip(rparams, w0, zs):
                    p.copy_(w + sign * h * z)
                losses.append(float(loss64()))
            for p, w in zip(rparams, w0):
                p.copy_(w)
        return (losses[0] - losses[1]) / (2 * h)

    loss64().backward()
    dirderiv = sum(float((p.grad * z).sum()) for p, z in zip(rparams, zs))
    # Same eps, float64 copies: the fp32 losses carry ~1e-6 absolute noise, /(2 eps) ~1e-3 in g.
    assert abs(est.g - fd64(eps)) < 2e-3 + 1e-3 * abs(est.g)
    # The float64 reference is itself right: a small-step central difference matches the backprop
    # directional derivative (RMSNorm still runs in fp32 inside HF, ~1e-7 loss noise / 2h).
    assert abs(fd64(1e-4) - dirderiv) < 5e-4 * max(1.0, abs(dirderiv))
    assert abs(est.g) > 0.05  # the check is not vacuous


def test_perturb_restore_is_bit_identical_including_tied_and_on_error():
    model, b = tiny(), batch()
    params = zo_parameters(model)
    before = snapshot(params)
    ptrs = [p.data_ptr() for p in params]
    for seed in (1, 2, 3):
        zo_estimate(model, params, seed, 1e-3, b)
    assert all(torch.equal(p, w) for p, w in zip(params, before))
    assert [p.data_ptr() for p in params] == ptrs
    assert model.lm_head.weight is model.model.embed_tokens.weight

    from thinwire.train.zeroth_order import perturbed

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), torch.no_grad(), perturbed(model, params, 9, 0.5):
        model(**b)
        model.model.embed_tokens(b["input_ids"])  # leaves the tied weight perturbed mid-block
        raise Boom
    assert all(torch.equal(p, w) for p, w in zip(params, before))


_CHILD = """
import hashlib, sys
from thinwire.train.zeroth_order import direction
for seed, ti, shape in [(5, 0, (3, {B} + 5)), (2**63 + 11, 17, (7,)), (0, 3, (64, 32))]:
    print(hashlib.sha256(direction(seed, ti, shape).numpy().tobytes()).hexdigest())
"""


def test_direction_bit_identical_in_fresh_subprocess():
    here = [hashlib.sha256(direction(s, ti, sh).numpy().tobytes()).hexdigest()
            for s, ti, sh in [(5, 0, (3, BLOCK + 5)), (2**63 + 11, 17, (7,)), (0, 3, (64, 32))]]
    out = subprocess.run([sys.executable, "-c", _CHILD.format(B=BLOCK)], check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == here
    z = direction(5, 0, (3 * (BLOCK + 5),))
    assert z.dtype == torch.float32
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert not torch.equal(direction(5, 1, (64,)), direction(5, 0, (64,)))


def test_rebuild_bit_identical_across_copies_threads_and_formats():
    pool = SeedPool(256, 3)
    gen = torch.Generator().manual_seed(0)
    dense = torch.zeros(256)
    idx = torch.randperm(256, generator=gen)[:20]
    dense[idx] = torch.randn(20, generator=gen)
    a, b = tiny(), tiny()
    pa, pb = zo_parameters(a), zo_parameters(b)
    n = apply_seed_scalars(pa, pool, dense, lr=1e-2, threads=1)
    as_dict = {int(k): float(dense[k]) for k in reversed(idx.tolist())}  # order must not matter
    as_dict[int(torch.nonzero(dense == 0)[0])] = 0.0  # zeros are skipped
    apply_seed_scalars(pb, pool, as_dict, lr=1e-2, threads=3)
    assert n == 20
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not torch.equal(pa[0], zo_parameters(tiny())[0])
    assert a.lm_head.weight is a.model.embed_tokens.weight


def test_incremental_rebuild_close_to_full_rebuild():
    pool, lr, u = SeedPool(64, 1), 1e-2, torch.finfo(torch.float32).eps
    gen = torch.Generator().manual_seed(4)
    old = {k: float(torch.randn(1, generator=gen)) * 3 for k in range(0, 40)}
    delta = {k: float(torch.randn(1, generator=gen)) for k in range(20, 64)}
    full = {k: old.get(k, 0.0) + delta.get(k, 0.0) for k in range(64)}
    m_full, m_inc = tiny(), tiny()
    w0 = snapshot(zo_parameters(m_full))
    apply_seed_scalars(zo_parameters(m_full), pool, full, lr)
    apply_seed_scalars(zo_parameters(m_inc), pool, old, lr)
    w_old = snapshot(zo_parameters(m_inc))
    apply_seed_scalars(zo_parameters(m_inc), pool, delta, lr)
    pairs = zip(zo_parameters(m_full), zo_parameters(m_inc), w0, w_old)
    for i, (pf, pi, w, wo) in enumerate(pairs):
        mag = sum(abs(g) * direction(pool.seed(k), i, w.shape).abs() for k, g in full.items())
        mag = mag + sum(abs(g) * direction(pool.seed(k), i, w.shape).abs() for k, g in old.items())
        # Rounding bound: <= 1/2 ulp per update of w (one in the full route, two incremental),
        # plus float32 accumulation of n terms (<= n*u*sum|G z|) and rounding G to float32,
        # scaled by lr. Two routes -> both errors add.
        bound = u * (pf.abs() + wo.abs() + pi.abs()) + lr * u * (len(full) + 2) * mag
        assert torch.all((pf - pi).abs() <= bound), i
        assert not torch.equal(pf, w)  # the update happened
    assert max(float((pf - pi).detach().abs().max()) for pf, pi in
               zip(zo_parameters(m_full), zo_parameters(m_inc))) < 1e-5


def test_zo_train_reduces_loss_and_is_deterministic():
    data = torch.randint(0, 16, (4, 16), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": data[i : i + 2], "labels": data[i : i + 2]} for i in (0, 2)]
    whole = {"input_ids": data, "labels": data}
    pool = SeedPool(64, 3)

    model = tiny()
    with torch.no_grad():
        before = float(model(**whole).loss)
    res = zo_train(model, zo_parameters(model), pool, batches, 300, lr=2e-3, eps=1e-3,
                   generator=torch.Generator().manual_seed(0), threads=1)
    with torch.no_grad():
        after = float(model(**whole).loss)
    assert after < before - 0.3, (before, after)
    assert sum(res.losses[-20:]) < sum(res.losses[:20])
    assert int(res.counts.sum()) == 300 and len(res.steps) == 300
    sums = torch.zeros(64, dtype=torch.float64)
    for k, g in res.steps:
        sums[k] += g
    assert torch.equal(sums, res.scalars)
    idx, vals = res.sparse()
    assert torch.equal(idx, torch.nonzero(res.counts).view(-1))
    assert vals.dtype == torch.float32

    runs = []
    for threads in (1, 2):
        m = tiny()
        r = zo_train(m, zo_parameters(m), pool, iter(batches * 5), 10, lr=2e-3, eps=1e-3,
                     generator=torch.Generator().manual_seed(5), threads=threads)
        runs.append((snapshot(zo_parameters(m)), r.steps))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(x, y) for x, y in zip(runs[0][0], runs[1][0]))
    with pytest.raises(ValueError):
        zo_train(tiny(), zo_parameters(tiny()), pool, iter(batches), 3, lr=1e-3, eps=1e-3,
                 generator=torch.Generator())


def test_zo_step_draws_z_once_with_the_bits_of_the_three_draw_route(monkeypatch):
    import thinwire.train.zeroth_order as zo

    data = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": data, "labels": data}
    pool = SeedPool(16, 1)
    slow, fast = tiny(), tiny()
    est = zo_estimate(slow, zo_parameters(slow), pool.seed(5), 1e-3, batch)
    apply_seed_scalars(zo_parameters(slow), pool, {5: est.g}, lr=1e-2)
    draws = []
    monkeypatch.setattr(zo, "_fill_block", lambda out, gen, key, block, real=zo._fill_block:
                        draws.append((key, block)) or real(out, gen, key, block))
    step = zo.zo_step(fast, zo_parameters(fast), pool.seed(5), 1e-3, 1e-2, batch)
    assert step == est
    assert all(torch.equal(a, b) for a, b in zip(zo_parameters(slow), zo_parameters(fast)))
    assert len(draws) == len(set(draws)) == sum(-(-p.numel() // zo.BLOCK) for p in zo_parameters(fast))


def test_pro_probabilities_by_hand():
    h = SeedHistory.empty(4)
    assert torch.allclose(h.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    h.record([(0, 0.5), (0, -1.5), (2, 2.0)])
    # importance = (initial 0 + sum|g|) / (1 + count): [2/3, 0, 1, 0]; min-max -> same; softmax.
    e = [math.exp(2 / 3), 1.0, math.e, 1.0]
    want = torch.tensor([x / sum(e) for x in e], dtype=torch.float64)
    assert torch.allclose(h.probabilities(), want)

    c = SeedHistory.empty(4, clip=0.5)
    c.record([(0, 0.5), (0, -1.5), (2, 2.0), (3, 0.1)])
    # clipped: [(0.5+0.5)/3, 0, 0.5/2, 0.1/2] = [1/3, 0, 1/4, 1/20] -> min-max /(1/3).
    normed = [1.0, 0.0, 0.75, 0.15]
    e = [math.exp(x) for x in normed]
    want = torch.tensor([x / sum(e) for x in e], dtype=torch.float64)
    assert torch.allclose(c.probabilities(), want)
    flat = pro_probabilities(torch.tensor([3.0, 3.0]))
    assert torch.equal(flat, torch.tensor([0.5, 0.5], dtype=torch.float64))

    probs = c.probabilities()
    draws = [sample_seed_index(torch.Generator().manual_seed(9), 4, probs) for _ in range(3)]
    assert len(set(draws)) == 1
    many = torch.Generator().manual_seed(1)
    drawn = torch.tensor([sample_seed_index(many, 4, probs) for _ in range(4000)])
    counts = torch.bincount(drawn, minlength=4)
    assert torch.allclose(counts / 4000.0, probs.float(), atol=0.03)


def test_bfloat16_and_non_contiguous_params():
    model, b = tiny().to(torch.bfloat16), batch()
    params = zo_parameters(model)
    before = snapshot(params)
    est = zo_estimate(model, params, 4, 1e-2, b)
    assert math.isfinite(est.g)
    assert all(torch.equal(p, w) for p, w in zip(params, before))
    pool = SeedPool(8, 0)
    apply_seed_scalars(params, pool, {2: 1.5}, lr=1e-2)
    for i in (0, len(params) - 1):  # bf16 route: float32 update, then one cast
        z = direction(pool.seed(2), i, before[i].shape)
        want = before[i].float().add_(z * 1.5, alpha=-1e-2).to(torch.bfloat16)
        assert torch.equal(params[i], want)
    # Non-contiguous storage: z follows the logical (row-major) layout; weights land in place.
    p = torch.nn.Parameter(torch.zeros(8, 5).t())
    apply_seed_scalars([p], pool, {3: 1.0}, lr=-1.0)  # 0 + 1 * z, exact
    assert torch.equal(p, direction(pool.seed(3), 0, (5, 8))) and not p.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gets_the_same_z():
    pool = SeedPool(8, 0)
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(torch.zeros(3, BLOCK + 7, device=device))
        apply_seed_scalars([p], pool, {5: 1.0}, lr=-1.0)  # 0 + 1 * z, exact on any device
        assert torch.equal(p.cpu(), direction(pool.seed(5), 0, p.shape))
