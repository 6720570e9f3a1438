"""Ferret's projection codec: blocks, allocation, bases, projection, aggregation, reconstruction."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from thinwire.compress.projection import (
    GRID,
    ProjectionCodec,
    aggregate,
    allocate,
    block_norms,
    pack,
    partition_blocks,
    unpack,
)
from thinwire.compress.sketch import SketchCodec, make_codec


def fake_llama(layers=3, vocab=100, hidden=16, kv=4, inter=40, tied=False):
    """Shapes in Hugging Face Llama's named_parameters() order."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not tied:
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def random_delta(shapes, seed=0, scales=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (n, s) in enumerate(shapes):
        out[n] = torch.randn(s, generator=g) * (1.0 if scales is None else scales[i])
    return out


def flat(tensors, shapes):
    return torch.cat([tensors[n].reshape(-1).double() for n, _ in shapes])


# ---- blocks ------------------------------------------------------------------------------------


def test_partition_code_rule_by_hand():
    # numels: 7 norms of 16, 6 k/v of 64, 6 q/o of 256, 9 mlp of 640, embed + lm_head 1600
    # median of 30 = 256 → target int(0.9·256) = 230; k+v = 128 fits, +o does not
    blocks = partition_blocks(fake_llama(), "code")
    names = [b.names for b in blocks]
    assert len(blocks) == 1 + 3 * 7 + 1
    assert names[0] == ("model.embed_tokens.weight",)
    assert names[1] == ("model.layers.0.self_attn.q_proj.weight",)
    assert names[2] == ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight")
    assert names[7] == ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight")
    assert names[-2] == (
        "model.layers.2.input_layernorm.weight",
        "model.layers.2.post_attention_layernorm.weight",
        "model.norm.weight",
    )
    assert names[-1] == ("lm_head.weight",)
    assert [b.index for b in blocks] == list(range(len(blocks)))
    assert sum(b.size for b in blocks) == sum(math.prod(s) for _, s in fake_llama())


def test_partition_code_rule_gives_papers_194_blocks():
    # the paper's 24-layer 1.3B Llama (multi-head attention, untied head): L = 194
    shapes = fake_llama(layers=24, vocab=32000, hidden=2048, kv=2048, inter=5504)
    assert len(partition_blocks(shapes, "code")) == 194


def test_partition_other_rules_by_hand():
    shapes = fake_llama()
    matrix = partition_blocks(shapes, "matrix")
    assert len(matrix) == 1 + 3 * 7 + 1  # norms join the down_proj before them
    assert matrix[7].names == (
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    )
    assert matrix[-2].names[-1] == "model.norm.weight"
    assert len(partition_blocks(shapes, "tensor")) == len(shapes)
    layer = partition_blocks(shapes, "layer")
    assert [len(b.names) for b in layer] == [1, 9, 9, 10, 1]
    with pytest.raises(ValueError):
        partition_blocks(shapes, "nope")


def test_block_gather_split_roundtrip():
    shapes = fake_llama(layers=1)
    delta = random_delta(shapes)
    for b in partition_blocks(shapes, "code"):
        back = b.split(b.gather(delta))
        for n in b.names:
            assert torch.equal(back[n], delta[n])


# ---- allocation --------------------------------------------------------------------------------


def test_allocate_code_rule_by_hand():
    assert allocate([4.0, 2.0, 0.0, 0.01, 3.0], k_max=200, k_min=2) == [200, 100, 0, 2, 150]
    assert allocate([0.0, 0.0]) == [0, 0]
    with pytest.raises(ValueError):
        allocate([1.0, float("nan")])


def test_allocate_proportional_by_hand():
    norms = [4.0, 2.0, 0.0, 0.01, 3.0]
    # shares of 100: 44.4, 22.2, -, 0.11→pinned 2; the other 98 over 4:2:3 = 43.56, 21.78, 32.67
    assert allocate(norms, k_max=50, k_min=2, rule="proportional", budget=100) == [43, 22, 0, 2, 33]
    # the 4.0 block is capped at 40; 58 left over 2:3 = 23.2, 34.8
    assert allocate(norms, k_max=40, k_min=2, rule="proportional", budget=100) == [40, 23, 0, 2, 35]
    assert sum(allocate([1.0, 1.0, 1.0], k_max=50, rule="proportional", budget=10)) == 10
    # the capped block comes down to make room for the k_min floors: 4 + 2 + 2 + 2 = 10
    assert allocate([100.0, 1.0, 1.0, 1.0], k_max=5, k_min=2, rule="proportional", budget=10) == [4, 2, 2, 2]


# ---- bases -------------------------------------------------------------------------------------

BASIS_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys, torch
    from thinwire.compress.projection import partition_blocks
    from thinwire.compress.sketch import make_codec
    shapes = [("a", (3, GRID)), ("b", (7, 5)), ("c", (300,))]
    codec = make_codec(partition_blocks(shapes, "tensor"), 1234, sys.argv[1], k_max=16, threads=2)
    h = hashlib.sha256()
    for l in range(3):
        h.update(codec.basis(5, l, 0, 16).numpy().tobytes())
    coords = [torch.linspace(-1, 1, 16) for _ in range(3)]
    for name, t in sorted(codec.reconstruct(coords, 5, clip=0.5).items()):
        h.update(t.numpy().tobytes())
    print(h.hexdigest())
    """
).replace("GRID", str(GRID))


@pytest.mark.parametrize("dist", ["uniform", "sign", "trunc_normal", "sketch"])
def test_bases_and_reconstruction_identical_in_fresh_process(dist):
    here = subprocess.run([sys.executable, "-c", BASIS_SCRIPT, dist], capture_output=True, text=True, check=True)
    again = subprocess.run(
        [sys.executable, "-c", BASIS_SCRIPT.replace("threads=2", "threads=1"), dist],
        capture_output=True,
        text=True,
        check=True,
    )
    exec_hash = hashlib.sha256()
    codec_shapes = [("a", (3, GRID)), ("b", (7, 5)), ("c", (300,))]
    codec = make_codec(partition_blocks(codec_shapes, "tensor"), 1234, dist, k_max=16, threads=3)
    for l in range(3):
        exec_hash.update(codec.basis(5, l, 0, 16).numpy().tobytes())
    coords = [torch.linspace(-1, 1, 16) for _ in range(3)]
    for _name, t in sorted(codec.reconstruct(coords, 5, clip=0.5).items()):
        exec_hash.update(t.numpy().tobytes())
    assert here.stdout.strip() == again.stdout.strip() == exec_hash.hexdigest()


def test_chunked_generation_matches_unchunked():
    codec = ProjectionCodec(partition_blocks([("w", (5, GRID // 2 + 3))], "tensor"), run_seed=9, k_max=8)
    full = codec.basis(0, 0, 0, 8)  # 2.5 chunks of the grid
    assert full.shape == (8, codec.blocks[0].size)
    assert torch.equal(codec.basis(0, 0, 3, 6), full[3:6])  # along k
    a, b = GRID // 3, 2 * GRID + 17  # along d, across chunk edges
    assert torch.equal(codec.basis(0, 0, 0, 8, start=a, stop=b), full[:, a:b])
    assert not torch.equal(codec.basis(1, 0, 0, 8), full)  # a new round draws new bases
    # distinct (block, basis, chunk) never share a generator seed within a round
    seeds = [s for c in range(codec.blocks[0].n_chunks) for s in codec.seeds(0, 0, range(8), c)]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("dist", ["uniform", "uniform8", "sign", "trunc_normal"])
def test_basis_variance_matches_rho(dist):
    codec = ProjectionCodec(partition_blocks([("w", (64, 64))], "tensor"), run_seed=3, k_max=200, dist=dist)
    v = codec.basis(0, 0, 0, 200).double()
    d = codec.blocks[0].size
    assert v.abs().max() <= 1 / math.sqrt(d)  # ‖v‖ ≤ 1, the released code's support
    ratio = float(v.square().mean()) / codec.rho(0)
    assert abs(ratio - 1) < 4 * math.sqrt(0.8 / v.numel()) + 1e-12  # kurtosis ≤ 1.8 → var(v²) ≤ 0.8 ρ²
    assert abs(float(v.mean())) < 4 * math.sqrt(codec.rho(0) / v.numel())


# ---- projection and reconstruction -------------------------------------------------------------


def test_projection_matches_dense_and_uses_prefix_bases():
    shapes = [("a", (40, GRID // 16)), ("b", (33,))]
    blocks = partition_blocks(shapes, "tensor")
    codec = ProjectionCodec(blocks, run_seed=5, k_max=20, threads=2)
    delta = random_delta(shapes, seed=1)
    ks = [20, 7]
    coords = codec.project(delta, 3, ks)
    for blk, g, k in zip(blocks, coords, ks):
        v = codec.basis(3, blk.index, 0, k).double()
        want = v @ blk.gather(delta).double() / (codec.rho(blk.index) * k)
        # float32 dots: ~1e-6 of the largest coordinate (the wire carries fp16 anyway)
        assert torch.allclose(g.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    fewer = codec.project(delta, 3, [5, 7])
    assert torch.allclose(fewer[0] * 5, coords[0][:5] * 20, rtol=1e-5)
    code = codec.project(delta, 3, ks, scaling="code")
    for blk, g, c in zip(blocks, coords, code):
        assert torch.allclose(c.double(), g.double() * codec.rho(blk.index) * blk.size, rtol=1e-5)


def test_reconstruction_matches_dense():
    shapes = [("a", (3, GRID)), ("b", (7, 5))]
    blocks = partition_blocks(shapes, "tensor")
    for dist in ("uniform", "uniform8", "sign", "trunc_normal"):
        codec = ProjectionCodec(blocks, run_seed=5, k_max=12, dist=dist)
        coords = [torch.randn(12, generator=torch.Generator().manual_seed(1)), torch.tensor([0.0, 2.0, 0.0, -1.0])]
        rec = codec.reconstruct(coords, 0)
        for blk, g in zip(blocks, coords):
            want = codec.basis(0, blk.index, 0, g.numel()).double().T @ g.double()
            got = blk.gather(rec).double()
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_k_equal_d_sanity():
    d = 32
    shapes = [("w", (4, 8))]
    blocks = partition_blocks(shapes, "tensor")
    delta = random_delta(shapes, seed=2)
    x = flat(delta, shapes)
    codec = ProjectionCodec(blocks, run_seed=11, k_max=64 * d)
    # K = d: the d×d basis is full rank, Δ̃ = VVᵀΔ/(ρd), error ≈ √(d/K) = 1
    rec = flat(codec.reconstruct(codec.project(delta, 0, [d]), 0), shapes)
    v = codec.basis(0, 0, 0, d).double()
    assert torch.linalg.matrix_rank(v) == d
    assert torch.allclose(rec, v.T @ (v @ x) / (codec.rho(0) * d), rtol=1e-4, atol=1e-5)
    assert 0.4 < float((rec - x).norm() / x.norm()) < 1.8
    # K = 64·d: nearly orthogonal overcomplete frame, error ≈ √(1/64)
    rec = flat(codec.reconstruct(codec.project(delta, 0, [64 * d]), 0), shapes)
    err = float((rec - x).norm() / x.norm())
    assert 0.06 < err < 0.2
    assert float(torch.nn.functional.cosine_similarity(rec, x, dim=0)) > 0.98


@pytest.mark.parametrize("dist", ["uniform", "uniform8", "sign", "sketch"])
def test_reconstruction_is_unbiased(dist):
    shapes = [("a", (8, 8)), ("b", (64,))]
    blocks = partition_blocks(shapes, "tensor")
    delta = random_delta(shapes, seed=4, scales=[1.0, 3.0])
    x = flat(delta, shapes)
    k = 8
    codec = make_codec(blocks, 21, dist, k_max=k, threads=1)
    recs = [flat(codec.reconstruct(codec.project(delta, r, [k, k]), r), shapes) for r in range(1600)]
    # one reconstruction: E‖Δ̃−Δ‖² ≈ (d/K)‖Δ‖² per block, so the mean of n has relative error √(d/(K n))
    for n in (100, 1600):
        err = float((torch.stack(recs[:n]).mean(0) - x).norm() / x.norm())
        theory = math.sqrt(64 / (k * n))
        assert 0.6 * theory < err < 1.4 * theory, (n, err, theory)


def test_aggregation_equals_weighted_mean_of_reconstructions():
    shapes = [("a", (16, 16)), ("b", (2, GRID // 2 + 5))]
    blocks = partition_blocks(shapes, "tensor")
    codec = ProjectionCodec(blocks, run_seed=8, k_max=30, threads=2)
    d1, d2 = random_delta(shapes, seed=1, scales=[10.0, 1.0]), random_delta(shapes, seed=2, scales=[0.1, 2.0])
    c1 = codec.project(d1, 4, allocate(block_norms(blocks, d1), k_max=30))
    c2 = codec.project(d2, 4, allocate(block_norms(blocks, d2), k_max=30))
    assert [c.numel() for c in c1] != [c.numel() for c in c2]  # different K_l per client
    agg = codec.reconstruct(aggregate([c1, c2], weights=[30, 10]), 4)
    r1, r2 = codec.reconstruct(c1, 4), codec.reconstruct(c2, 4)
    for n, _ in shapes:
        want = 0.75 * r1[n].double() + 0.25 * r2[n].double()
        assert torch.allclose(agg[n].double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    eq = aggregate([c1, c2])
    assert torch.allclose(eq[0][: c2[0].numel()], (c1[0][: c2[0].numel()] + c2[0]) / 2, atol=1e-6)


@pytest.mark.parametrize("dist", ["uniform", "sketch"])
def test_reconstruction_deterministic_across_threads(dist):
    shapes = fake_llama(layers=1, vocab=GRID // 8, hidden=20)  # the embedding spans 3 chunks
    blocks = partition_blocks(shapes, "code")
    delta = random_delta(shapes, seed=6)
    ks = allocate(block_norms(blocks, delta), k_max=24)
    coords = make_codec(blocks, 2, dist, k_max=24, threads=2).project(delta, 1, ks)
    before = torch.get_num_threads()
    outs = []
    for threads, intra in ((1, before), (2, before), (3, 1), (2, 2)):
        torch.set_num_threads(intra)
        try:
            rec = make_codec(blocks, 2, dist, k_max=24, threads=threads).reconstruct(coords, 1, clip=5.0)
        finally:
            torch.set_num_threads(before)
        outs.append(rec)
    for rec in outs[1:]:
        assert all(torch.equal(rec[n], outs[0][n]) for n, _ in shapes)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("dist", ["uniform", "sketch"])
def test_iter_reconstruct_streams_and_restores_threads(dist):
    shapes = fake_llama(layers=2)
    blocks = partition_blocks(shapes, "code")
    codec = make_codec(blocks, 2, dist, k_max=10, threads=2)
    coords = [torch.ones(3) if b.index % 3 == 0 else torch.zeros(0) for b in blocks]
    before = torch.get_num_threads()
    seen = []
    for blk, piece in codec.iter_reconstruct(coords, 0):
        assert torch.get_num_threads() == before  # the caller's code runs with its own setting
        assert piece.numel() == blk.size
        assert bool(piece.any()) == (blk.index % 3 == 0)
        seen.append(blk.index)
    assert seen == list(range(len(blocks)))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("dist", ["uniform", "sketch"])
def test_clip_bounds_each_piece(dist):
    shapes = [("a", (50, 50))]
    blocks = partition_blocks(shapes, "tensor")
    codec = make_codec(blocks, 1, dist, k_max=4)
    big = [torch.tensor([1000.0, 0.0, 0.0, 0.0])]
    norm = float(codec.reconstruct(big, 0, clip=10.0)["a"].norm())
    assert 9.99 < norm <= 10.0 + 1e-5
    # every piece γ_j v_j is clipped on its own, whatever the basis vector's norm (≈ 25 for the sketch's
    # buckets of ~625 entries, < 1 for the dense bases)
    for j in range(4):
        one = torch.zeros(4)
        one[j] = 0.5  # below the clip: only the piece norm tells whether it must be clipped
        piece = float(codec.reconstruct([one], 0, clip=2.0)["a"].norm())
        assert piece <= 2.0 + 1e-5 and piece == pytest.approx(min(2.0, float(codec.reconstruct([one], 0)["a"].norm())))
    small = [torch.tensor([0.01, -0.005, 0.0, 0.02])]
    assert torch.equal(codec.reconstruct(small, 0, clip=10.0)["a"], codec.reconstruct(small, 0)["a"])
    with pytest.raises(ValueError):
        codec.reconstruct([torch.tensor([float("inf")])], 0)


# ---- the sketch basis ----------------------------------------------------------------------------


def test_sketch_bases_partition_the_block_with_signs_and_match_dense_products():
    shapes = [("w", (3, GRID // 2 + 7)), ("b", (11,))]
    blocks = partition_blocks(shapes, "tensor")
    codec = SketchCodec(blocks, run_seed=5, k_max=20, threads=2)
    v = codec.basis(3, 0, 0, 20).double()
    assert v.shape == (20, blocks[0].size)
    assert torch.equal(v.abs().sum(0), torch.ones(blocks[0].size, dtype=torch.float64))  # each entry in one basis
    assert set(v.unique().tolist()) == {-1.0, 0.0, 1.0}
    counts = v.abs().sum(1)  # entries per bucket: binomial(d, 1/k_max)
    mean, sd = blocks[0].size / 20, math.sqrt(blocks[0].size / 20)
    assert float((counts - mean).abs().max()) < 5 * sd
    assert abs(float(v.sum()) / blocks[0].size) < 5 / math.sqrt(blocks[0].size)  # signs balanced
    assert float(v.square().mean()) == pytest.approx(codec.rho(0))
    delta = random_delta(shapes, seed=1)
    coords = codec.project(delta, 3, [20, 6])
    for blk, g, k in zip(blocks, coords, (20, 6)):
        vk = codec.basis(3, blk.index, 0, k).double()
        want = vk @ blk.gather(delta).double() / (codec.rho(blk.index) * k)
        assert torch.allclose(g.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        got = blk.gather(codec.reconstruct([c if c is g else torch.zeros(0) for c in coords], 3)).double()
        assert torch.equal(got, (vk.T @ g.double()).float().double())  # ±γ copied: exact
    assert not torch.equal(codec.basis(4, 0, 0, 20), codec.basis(3, 0, 0, 20))  # fresh bases each round
    with pytest.raises(ValueError, match="unbiased"):
        codec.project(delta, 3, [20, 6], scaling="code")


def test_sketch_error_matches_theory_for_every_k():
    # E‖Δ̃−Δ‖²/‖Δ‖² = (d − 1)/K + k_max/K − 1 exactly, for any Δ (here a spiky one)
    shapes = [("w", (40, 50))]
    blocks = partition_blocks(shapes, "tensor")
    delta = random_delta(shapes, seed=3)
    delta["w"][0, :5] *= 30.0
    x = flat(delta, shapes)
    codec = SketchCodec(blocks, run_seed=7, k_max=50, threads=1)
    for k in (50, 10):
        errs = torch.tensor([float((flat(codec.reconstruct(codec.project(delta, r, [k]), r), shapes) - x).square().sum())
                             for r in range(400)]) / float(x.square().sum())
        theory = (2000 - 1) / k + 50 / k - 1
        assert abs(float(errs.mean()) / theory - 1) < 4 * float(errs.std()) / (theory * math.sqrt(400)), (k, errs.mean())


def test_pack_unpack_roundtrip():
    coords = [torch.tensor([1.0, -2.0]), torch.zeros(0), torch.tensor([0.5])]
    values, counts = pack(coords)
    assert values.dtype == torch.float16 and counts.tolist() == [2, 0, 1]
    back = unpack(values, counts)
    assert [b.tolist() for b in back] == [[1.0, -2.0], [], [0.5]]
    with pytest.raises(ValueError):
        unpack(values, torch.tensor([5], dtype=torch.int32))
