"""Ferret's projection codec: thinwire's implementation against the released code's approach.

An update shaped like SmolLM2-135M (134.5M unique weights, tied embedding), Δ random with a
different per-element scale per block, blocks by the released code's rule, K_l ∝ ‖Δ_l‖ with a
per-block maximum of 200 (the released rule). One client, one round:

- reference: the released code's approach, written out here: one seed pool of K = 200 shared by
  all blocks, a truncated-normal draw (`torch.nn.init.trunc_normal_`) per basis vector per
  block, one dot per basis, `d/K` scaling; the server regenerates all 200 × L bases, including
  those whose coordinate is zero, and clips every (seed, block) piece to norm 10.
- ours: `thinwire.compress.projection` with the same K_l, the same `d/K` scaling and clip, so the
  errors compare like for like; also with the paper's unbiased scaling, and the structured option
  (`thinwire.compress.sketch`, hashed signed buckets: O(d) per block instead of O(K·d)), whose
  error is compared with the unbiased dense row (it has no d/K scaling).

The reference takes minutes at full size on 2 cores, so both sides run on the same subset of
blocks (the embedding and the first `--ref-layers` layers, ≥ 10% of the weights); ours also runs
on the full model. Each side first picks its faster thread count (1 or `--threads`) in a short
trial. Prints a table (wall and CPU seconds), then `speedup_vs_reference=` (CPU time, all
threads counted: other tenants of a shared machine cannot inflate it) and
`relative_error_ratio=` (mean error of ours over 1 + `--error-rounds` rounds / the reference's over
`--ref-rounds` rounds: equal in expectation, with the sampling s.d. printed above it).

    python benchmarks/ferret_codec.py --ref-rounds 4   # full (18 minutes on 2 cores: ~4 per reference round)
    python benchmarks/ferret_codec.py --quick    # a small Llama, everything, under a minute
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

import numpy as np
import torch

from thinwire.compress.projection import ProjectionCodec, allocate, block_norms, partition_blocks
from thinwire.compress.sketch import SketchCodec

K_MAX, K_MIN, CLIP = 200, 2, 10.0


def clock() -> tuple[float, float]:
    """(wall, CPU of this process, all threads): CPU time is what a busy shared box can't inflate."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def llama_shapes(quick: bool) -> list[tuple[str, tuple[int, ...]]]:
    """Unique parameter shapes of SmolLM2-135M (or a small Llama), built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if quick:
        cfg = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # tied weights once


def make_delta(shapes, blocks, seed: int) -> dict[str, torch.Tensor]:
    """N(0, σ_l²) entries, σ_l log-uniform over a decade per block (an Adam-like update: ‖Δ_l‖ ∝ √d_l·σ_l)."""
    g = torch.Generator().manual_seed(seed)
    sigma = 2e-5 * 10 ** (-torch.rand(len(blocks), generator=g, dtype=torch.float64))
    shape = dict(shapes)
    return {n: torch.randn(shape[n], generator=g) * float(sigma[b.index]) for b in blocks for n in b.names}


def expected_error(blocks, norms, ks, rho, kurt, scaling="code") -> tuple[float, float]:
    """E‖Δ̃−Δ‖/‖Δ‖ for i.i.d. bases (variance ρ, kurtosis κ), and its sampling s.d.

    Per block, with Δ̃ = s Σ_j v_j v_jᵀΔ: E‖Δ̃−Δ‖² = ‖Δ‖²[s²K((d−2+κ)ρ² + Kρ²) − 2sKρ + 1];
    the measured value fluctuates like a χ² with K degrees of freedom (s.d. ≈ √(2/K) of it).
    """
    tot = var = 0.0
    for b in blocks:
        k, d, r = ks[b.index], b.size, rho(b)
        if k == 0:
            e = norms[b.index] ** 2
        else:
            s = d / k if scaling == "code" else 1.0 / (r * k)
            e = norms[b.index] ** 2 * (s * s * k * ((d - 2 + kurt) * r * r + k * r * r) - 2 * s * k * r + 1)
            var += 2.0 / k * e * e
        tot += e
    ref = math.sqrt(sum(norms[b.index] ** 2 for b in blocks))
    return math.sqrt(tot) / ref, 0.5 * math.sqrt(var) / (math.sqrt(tot) * ref)


def sketch_expected_error(blocks, norms, ks) -> tuple[float, float]:
    """E‖Δ̃−Δ‖/‖Δ‖ of the sketch basis: ((d−1)/K + k_max/K − 1)·‖Δ_l‖² per block, exactly, and its s.d.

    The s.d. is taken as a χ² with K degrees of freedom, as for the dense bases (an estimate).
    """
    tot = var = 0.0
    for b in blocks:
        k = ks[b.index]
        e = norms[b.index] ** 2 * (((b.size - 1) + K_MAX) / k - 1 if k else 1.0)
        tot += e
        var += 2.0 / k * e * e if k else 0.0
    ref = math.sqrt(sum(norms[b.index] ** 2 for b in blocks))
    return math.sqrt(tot) / ref, 0.5 * math.sqrt(var) / (math.sqrt(tot) * ref)


def rel_error(blocks, delta, rec_flat) -> float:
    num = den = 0.0
    for b in blocks:
        x = b.gather(delta).double()
        num += float((rec_flat[b.index].double() - x).square().sum())
        den += float(x.square().sum())
    return math.sqrt(num / den)


def fastest_threads(trial, candidates) -> tuple[int, dict[int, float]]:
    """The intra-op thread count under which `trial` runs fastest (best of 2), and the times.

    Why: on a busy 2-core machine a torch op split over 2 threads can stall for milliseconds
    waiting for a descheduled thread; each side gets its own best setting.
    """
    times = {}
    saved = torch.get_num_threads()
    for t in dict.fromkeys(candidates):
        torch.set_num_threads(t)
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            trial(t)
            best = min(best, time.perf_counter() - t0)
        times[t] = best
    torch.set_num_threads(saved)
    return min(times, key=times.get), times


def run_reference(blocks, delta, ks, seed: int) -> tuple[tuple, tuple, dict[int, torch.Tensor], int]:
    """The released code's projection and server update (per basis, truncated normal, all K × L)."""
    pool = np.random.RandomState(seed).randint(1, 100000000000, K_MAX)
    rng = random.Random(seed)
    gen = torch.Generator()
    drawn = 0
    t0 = clock()
    coords = {}
    for b in blocks:  # client
        x = b.gather(delta)  # the released code concatenates per call; once here
        d, bound = b.size, b.size ** -0.5
        coord = torch.zeros(K_MAX)
        if ks[b.index]:
            for idx in rng.sample(range(K_MAX), ks[b.index]):
                gen.manual_seed(int(pool[idx]))
                base = torch.nn.init.trunc_normal_(torch.empty(d), 0.0, 1.0, -bound, bound, generator=gen)
                coord[idx] = torch.sum(x * base)
                drawn += d
            coord *= d / ks[b.index]
        coords[b.index] = coord
    t_client = since(t0)
    t0 = clock()
    rec = {b.index: torch.zeros(b.size) for b in blocks}
    for i, s in enumerate(pool):  # server: every seed, every block
        for b in blocks:
            bound = b.size ** -0.5
            gen.manual_seed(int(s))
            base = torch.nn.init.trunc_normal_(torch.empty(b.size), 0.0, 1.0, -bound, bound, generator=gen)
            base.mul_(coords[b.index][i])
            drawn += b.size
            if torch.isfinite(base).all():
                n = torch.linalg.norm(base)
                if torch.isfinite(n):
                    c = CLIP / (n + 1e-8)
                    if c < 1:
                        base.mul_(c)
                    rec[b.index].add_(base)
    return t_client, since(t0), rec, drawn


def run_ours(
    codec, blocks, delta, ks, round_idx: int, scaling="code"
) -> tuple[tuple, tuple, dict[int, torch.Tensor], int]:
    """Client projection and server reconstruction with thinwire's codec, restricted to `blocks`."""
    wanted = {b.index for b in blocks}
    ks_sub = [k if i in wanted else 0 for i, k in enumerate(ks)]
    t0 = clock()
    coords = codec.project(delta, round_idx, ks_sub, scaling=scaling)
    t_client = since(t0)
    t0 = clock()
    rec = {blk.index: flat for blk, flat in codec.iter_reconstruct(coords, round_idx, clip=CLIP) if blk.index in wanted}
    t_server = since(t0)
    if isinstance(codec, SketchCodec):  # one 32-bit draw per entry, each side
        drawn = 2 * sum(b.size for b in blocks if ks_sub[b.index])
    else:
        drawn = 2 * sum(ks_sub[b.index] * b.size for b in blocks)
    return t_client, t_server, rec, drawn


def variance_rows(quick: bool) -> list[tuple]:
    """Measured per-entry variance ×3d of each generator against the ρ the codec uses."""
    rows = []
    n = 2**18 if quick else 2**21
    for d in (16, 576):
        for dist in ("uniform", "uniform8", "sign", "trunc_normal"):
            blk = partition_blocks([("w", (d,))], "tensor")
            codec = ProjectionCodec(blk, run_seed=0, k_max=n // d, dist=dist, threads=1)
            v = codec.basis(0, 0, 0, n // d).double()
            meas = float(v.square().mean()) * 3 * d
            kurt = 1.0 if dist == "sign" else 1.8
            rows.append((d, dist, meas, codec.rho(0) * 3 * d, math.sqrt((kurt - 1) / v.numel())))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small Llama, every block on both sides")
    ap.add_argument("--threads", type=int, default=2, help="threads to use at most, both sides (default 2)")
    ap.add_argument("--ref-threads", type=int, default=0,
                    help="reference's torch threads (default: the faster of 1, --threads)")
    ap.add_argument("--our-threads", type=int, default=0, help="codec threads (default: the faster of 1, --threads)")
    ap.add_argument("--ref-layers", type=int, default=1, help="layers besides the embedding in the shared subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--error-rounds", type=int, default=3,
                    help="extra rounds (fresh bases) of ours to average its error over (default 3)")
    ap.add_argument("--ref-rounds", type=int, default=1,
                    help="rounds (fresh seed pools) of the reference to average its error over (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    shapes = llama_shapes(args.quick)
    blocks = partition_blocks(shapes, "code")
    total = sum(b.size for b in blocks)
    delta = make_delta(shapes, blocks, args.seed)
    norms = block_norms(blocks, delta)
    ks = allocate(norms, k_max=K_MAX, k_min=K_MIN, rule="code")
    if args.quick:
        subset = blocks
    else:
        keep = ("embed_tokens",) + tuple(f"layers.{i}." for i in range(args.ref_layers))
        subset = [b for b in blocks if all(any(k in n for k in keep) for n in b.names)]
    sub_w = sum(b.size for b in subset)
    emb = next(b for b in blocks if any("embed_tokens" in n for n in b.names))

    x_emb = emb.gather(delta)

    def ref_trial(_t):
        gen = torch.Generator().manual_seed(1)
        b = emb.size ** -0.5
        torch.sum(x_emb * torch.nn.init.trunc_normal_(torch.empty(emb.size), 0.0, 1.0, -b, b, generator=gen))

    def our_trial(t):
        c = ProjectionCodec(blocks, run_seed=args.seed, k_max=K_MAX, threads=t)
        c.project(delta, 99, [4 if b is emb else 0 for b in blocks])

    ref_threads, ref_cal = ((args.ref_threads, {}) if args.ref_threads
                            else fastest_threads(ref_trial, (1, args.threads)))
    our_threads, our_cal = ((args.our_threads, {}) if args.our_threads
                            else fastest_threads(our_trial, (1, args.threads)))
    del x_emb

    def codec(dist):
        return ProjectionCodec(blocks, run_seed=args.seed, k_max=K_MAX, dist=dist, threads=our_threads)

    results = []

    def record(label, where, dist, tc, ts, drawn, err, expected):
        """One table row; times are (wall, cpu) pairs."""
        exp, sd = expected
        results.append(dict(label=label, where=where, dist=dist, client=tc, server=ts, drawn=drawn, err=err,
                            exp=exp, sd=sd, wall=tc[0] + ts[0], cpu=tc[1] + ts[1]))
        return results[-1]

    def theory(bs, dist, scaling="code"):
        c = codec(dist)
        kurt = 1.0 if dist == "sign" else 1.8
        return expected_error(bs, norms, ks, lambda b: c.rho(b.index), kurt, scaling)

    torch.set_num_threads(ref_threads)
    t_c, t_s, rec, drawn = run_reference(subset, delta, ks, args.seed)
    torch.set_num_threads(args.threads)
    ref = record("reference (released approach)", "subset", "trunc_normal", t_c, t_s, drawn,
                 rel_error(subset, delta, rec), theory(subset, "trunc_normal"))
    del rec
    ref_errors = [ref["err"]]
    for r in range(1, args.ref_rounds):
        torch.set_num_threads(ref_threads)
        rec = run_reference(subset, delta, ks, args.seed + r)[2]
        ref_errors.append(rel_error(subset, delta, rec))
        del rec
    torch.set_num_threads(args.threads)
    ours = None
    for dist in ("uniform", "uniform8", "sign"):
        t_c, t_s, rec, drawn = run_ours(codec(dist), subset, delta, ks, round_idx=0)
        row = record(f"ours ({dist})", "subset", dist, t_c, t_s, drawn, rel_error(subset, delta, rec),
                     theory(subset, dist))
        ours = ours or row
        del rec
    t_c, t_s, rec, drawn = run_ours(codec("uniform"), subset, delta, ks, round_idx=0, scaling="unbiased")
    record("ours (uniform), unbiased scaling", "subset", "uniform", t_c, t_s, drawn, rel_error(subset, delta, rec),
           theory(subset, "uniform", "unbiased"))
    del rec
    sketch = SketchCodec(blocks, run_seed=args.seed, k_max=K_MAX, threads=our_threads)
    t_c, t_s, rec, drawn = run_ours(sketch, subset, delta, ks, round_idx=0, scaling="unbiased")
    record("ours (sketch basis), unbiased scaling", "subset", "sketch", t_c, t_s, drawn,
           rel_error(subset, delta, rec), sketch_expected_error(subset, norms, ks))
    del rec
    our_errors = [ours["err"]]
    if args.error_rounds > 0:
        runs = []
        for r in range(1, args.error_rounds + 1):
            t_c, t_s, rec, drawn = run_ours(codec("uniform"), subset, delta, ks, round_idx=r)
            runs.append((t_c, t_s, rel_error(subset, delta, rec)))
            our_errors.append(runs[-1][2])
            del rec
        exp, sd = theory(subset, "uniform")
        mean = lambda xs: tuple(float(np.mean(v)) for v in zip(*xs))  # noqa: E731
        record(f"ours (uniform), mean of rounds 1-{args.error_rounds}", "subset", "uniform",
               mean([x[0] for x in runs]), mean([x[1] for x in runs]), drawn, float(np.mean([x[2] for x in runs])),
               (exp, sd / math.sqrt(args.error_rounds)))
    if subset is not blocks:
        t_c, t_s, rec, drawn = run_ours(codec("uniform"), blocks, delta, ks, round_idx=0)
        record("ours (uniform)", "full model", "uniform", t_c, t_s, drawn, rel_error(blocks, delta, rec),
               theory(blocks, "uniform"))
        del rec
        t_c, t_s, rec, drawn = run_ours(sketch, blocks, delta, ks, round_idx=0, scaling="unbiased")
        record("ours (sketch basis), unbiased scaling", "full model", "sketch", t_c, t_s, drawn,
               rel_error(blocks, delta, rec), sketch_expected_error(blocks, norms, ks))
        del rec

    n_coord = sum(ks)
    model = "small Llama (--quick)" if args.quick else "SmolLM2-135M shapes"
    print(f"model: {model}, {total / 1e6:.1f}M unique weights, "
          f"{len(blocks)} blocks (released code's rule), K_max={K_MAX}, K_min={K_MIN}, K_l ∝ ‖Δ_l‖")
    print(f"coordinates per client: {n_coord} (mean K_l {n_coord / len(blocks):.1f}; embedding K={ks[emb.index]}, "
          f"d={emb.size})")
    print(f"shared subset: {len(subset)} blocks, {sub_w / 1e6:.1f}M weights = {100 * sub_w / total:.0f}% "
          f"({'all blocks' if args.quick else f'embedding + {args.ref_layers} layer(s)'}); "
          f"clip {CLIP}; 'code' scaling d/K unless noted")
    cal = lambda c: ", ".join(f"{t} thr {v:.2f}s" for t, v in c.items()) or "set by flag"  # noqa: E731
    print(f"threads ({os.cpu_count()} cores, shared): reference torch intra-op {ref_threads} (trial: {cal(ref_cal)}); "
          f"ours codec {our_threads} worker threads, 1 intra-op each (trial: {cal(our_cal)})")
    print(f"bytes per client per round: ours {2 * n_coord + 2 * len(blocks)} (fp16 values + a uint16 K_l per block; "
          f"positions are the first K_l bases); reference {3 * n_coord} sparse (fp16 + uint8 seed index), "
          f"{2 * K_MAX * len(blocks)} as the released code sends it (dense {K_MAX}×L fp16)")
    header = ("run", "blocks", "client s", "server s", "total s", "total CPU s", "values drawn", "CPU ns/value",
              "rel. error", "expected ± sd")
    rows = []
    for r in results:
        rows.append((r["label"], r["where"], f"{r['client'][0]:.2f}", f"{r['server'][0]:.2f}", f"{r['wall']:.2f}",
                     f"{r['cpu']:.2f}", f"{r['drawn'] / 1e9:.2f}G", f"{r['cpu'] / r['drawn'] * 1e9:.2f}",
                     f"{r['err']:.3f}", f"{r['exp']:.3f} ± {r['sd']:.3f}"))
    vrows = [(str(d), dist, f"{m:.5f}", f"{f:.5f}", f"{s:.5f}") for d, dist, m, f, s in variance_rows(args.quick)]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="Ferret codec: one client, one round")
        for h in header:
            t.add_column(h, justify="left" if h in ("run", "blocks") else "right")
        for r in rows:
            t.add_row(*r)
        v = Table(title="Basis entry variance ×3d: measured vs the ρ used (uniform ρ·3d = 1; trunc-normal 1 − 2/(15d))")
        for h in ("d", "dist", "measured", "ρ used", "s.d."):
            v.add_column(h, justify="right")
        for r in vrows:
            v.add_row(*r)
        Console(width=160).print(t, v)
    except ImportError:  # plain table
        for r in [header, *rows]:
            print(" | ".join(f"{c:>14}" for c in r))
        for r in [("d", "dist", "measured", "rho used", "sd"), *vrows]:
            print(" | ".join(f"{c:>12}" for c in r))

    ratio_sd = math.hypot(ours["sd"] / ours["exp"] / math.sqrt(len(our_errors)),
                          ref["sd"] / ref["exp"] / math.sqrt(len(ref_errors)))
    print(f"error: both sides use the same K_l, scaling and clip, so the expected error ratio is "
          f"{ours['exp'] / ref['exp']:.4f} (theory). Measured: ours {np.mean(our_errors):.4f} (mean of "
          f"{len(our_errors)} rounds), reference {np.mean(ref_errors):.4f} (mean of {len(ref_errors)}: "
          f"{', '.join(f'{e:.3f}' for e in ref_errors)}); the ratio's s.d. ≈ {ratio_sd:.3f}")
    print(f"speedup in wall time {ref['wall'] / ours['wall']:.2f}x; the line below uses CPU time (all threads "
          f"counted, immune to other tenants' load)")
    print(f"speedup_vs_reference={ref['cpu'] / ours['cpu']:.2f}")
    print(f"relative_error_ratio={np.mean(our_errors) / np.mean(ref_errors):.4f}")


if __name__ == "__main__":
    main()
