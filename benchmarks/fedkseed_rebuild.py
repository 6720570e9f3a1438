"""FedKSeed cost benchmark: rebuild from seed scalars, one local ZO step, peak memory.

Model: SmolLM2-135M-shaped Llama (random init, float32, CPU). Rebuild cost is linear in the
number of seeds applied (every seed regenerates d float32 normals), so the script times a few
seeds and extrapolates linearly to K = 4096 and to a realistic per-round delta; extrapolated rows
are marked. It also applies the same scalars two ways (all at once from w0, vs old scalars then
the changed ones) and reports how far apart the two routes land (they sum in different orders).

    python benchmarks/fedkseed_rebuild.py            # full size (a few minutes on 2 cores)
    python benchmarks/fedkseed_rebuild.py --quick    # 2-layer variant, fewer seeds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from thinwire.train.zeroth_order import (
    SeedPool,
    apply_seed_scalars,
    zo_estimate,
    zo_parameters,
    zo_step,
)

K = 4096
LR, EPS = 3e-7, 5e-4  # the FedKSeed authors' settings


def build(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                      tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


def make_batch(seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 49152, (1, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def expected_distinct(draws: int, k: int = K) -> float:
    return k * (1.0 - (1.0 - 1.0 / k) ** draws)


def timed(fn, reps: int = 1) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(mode: str, layers: int, seq: int, threads: int) -> None:
    """Runs in a fresh process: build, reset the RSS high-water mark, run one op, report."""
    model = build(layers)
    params = zo_parameters(model)
    batch = make_batch(seq)
    with torch.no_grad():
        model(**batch)  # warm-up: allocator pools, lazy init
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to current RSS
    base = status_kb("VmRSS")
    if mode == "plain":
        with torch.no_grad():
            float(model(**batch, use_cache=False).loss)
    else:
        pool = SeedPool(K, 0)
        zo_step(model, params, pool.seed(7), EPS, LR, batch, threads=threads)
    print(json.dumps({"base_kb": base, "peak_kb": status_kb("VmHWM")}))


def run_memory(mode: str, layers: int, seq: int, threads: int) -> dict[str, int]:
    out = subprocess.run([sys.executable, __file__, "--_mem", mode, "--layers", str(layers),
                          "--seq", str(seq), "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2-layer model, 4 seeds")
    ap.add_argument("--seeds", type=int, default=None, help="seeds in the measured rebuild")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch intra-op threads and z-generation worker threads")
    ap.add_argument("--_mem", choices=["plain", "zo"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    layers = args.layers or (2 if args.quick else 30)
    torch.set_num_threads(args.threads)  # intra-op threads and zeroth_order worker threads
    if args._mem:
        memory_child(args._mem, layers, args.seq, args.threads)
        return
    n = args.seeds or (4 if args.quick else 12)
    T = args.threads

    model = build(layers)
    params = zo_parameters(model)
    d = sum(p.numel() for p in params)
    w0 = [p.detach().clone() for p in params]
    pool = SeedPool(K, 0)
    print(f"model: Llama {layers} layers, {d / 1e6:.1f}M unique params, float32, "
          f"threads={T}, torch {torch.__version__}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")

    # Realistic scalars: per-step g ~ N(0, 1); a seed's accumulated G is a sum over its uses.
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(K, generator=gen)[:n].sort().values.tolist()
    old = {k: float(torch.randn(1, generator=gen) * 3) for k in idx[: n // 2 + n // 4]}
    delta = {k: float(torch.randn(1, generator=gen)) for k in idx[n // 4 :]}
    full = {k: old.get(k, 0.0) + delta.get(k, 0.0) for k in idx}

    # Route A: all accumulated scalars from w0 (timed).
    t_full = timed(lambda: apply_seed_scalars(params, pool, full, LR, threads=T))
    w_a = [p.detach().clone() for p in params]
    per_seed = t_full / len(full)
    # Route B: old scalars, then only the changed seeds (delta).
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)
    apply_seed_scalars(params, pool, old, LR, threads=T)
    t_delta = timed(lambda: apply_seed_scalars(params, pool, delta, LR, threads=T))
    diff = max(float((p.detach() - a).abs().max()) for p, a in zip(params, w_a))
    upd = max(float((a - w).abs().max()) for a, w in zip(w_a, w0))
    rel = max(float(((p.detach() - a).abs() / a.abs().clamp_min(1e-30)).max())
              for p, a in zip(params, w_a))
    # The same difference in float32 spacings (ulp) of each tensor's largest weight.
    inf = torch.tensor(float("inf"))
    ulps = max(float((p.detach() - a).abs().max() / (torch.nextafter(m, inf) - m))
               for p, a in zip(params, w_a) for m in [a.abs().max()])
    differ = sum(int((p.detach() != a).sum()) for p, a in zip(params, w_a)) / d
    # Threads must not change bits: the same scalars with another thread count.
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)
    one = params[:3]
    other = 2 if T == 1 else 1
    apply_seed_scalars(one, pool, full, LR, threads=other)
    same_bits = all(torch.equal(p.detach(), a) for p, a in zip(one, w_a[:3]))

    # One local ZO step at batch 1, seq 64: two perturbed forwards + in-place update.
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)
    del w_a
    batch = make_batch(args.seq)
    with torch.no_grad():
        model(**batch)
        t_fwd = timed(lambda: model(**batch, use_cache=False), reps=3)
    state = {}
    t_est = timed(lambda: state.update(est=zo_estimate(model, params, pool.seed(3), EPS, batch,
                                                        threads=T)), reps=2)
    t_upd = timed(lambda: apply_seed_scalars(params, pool, {3: state["est"].g}, LR, threads=T))

    mem_plain = run_memory("plain", layers, args.seq, T)
    mem_zo = run_memory("zo", layers, args.seq, T)

    rows = [
        ("z generation + accumulate, per seed (measured)", f"{per_seed:.3f} s",
         f"{d / per_seed / 1e6:.0f} M normals/s"),
        (f"rebuild, {len(full)} seeds from w0 (measured)", f"{t_full:.2f} s", ""),
        (f"apply delta, {len(delta)} seeds (measured)", f"{t_delta:.2f} s", ""),
        ("rebuild, K=4096 seeds from w0 (extrapolated)", f"{per_seed * K:.0f} s",
         f"{per_seed * K / 60:.1f} min"),
        (f"delta, 1 round 4 clients x 200 steps ~{expected_distinct(800):.0f} seeds (extrap.)",
         f"{per_seed * expected_distinct(800):.0f} s", ""),
        (f"delta, 1 client x 200 steps ~{expected_distinct(200):.0f} seeds (extrap.)",
         f"{per_seed * expected_distinct(200):.0f} s", ""),
        ("routes A vs B: max |diff|", f"{diff:.3e}",
         f"<= {ulps:.1f} ulp of the tensor's max|w|; {differ:.1%} of weights differ; "
         f"{diff / upd:.1e} of max|w-w0|"),
        ("routes A vs B: max relative |diff|/|w|", f"{rel:.3e}", "largest where |w| is near 0"),
        (f"threads {other} vs {T}: bit-identical", str(same_bits), "first 3 tensors"),
        (f"plain forward, batch 1 x seq {args.seq}", f"{t_fwd * 1e3:.0f} ms", ""),
        ("ZO estimate (2 perturbed forwards)", f"{t_est * 1e3:.0f} ms", ""),
        ("ZO update w -= lr*g*z (1 seed)", f"{t_upd * 1e3:.0f} ms", ""),
        ("ZO local step total", f"{(t_est + t_upd) * 1e3:.0f} ms",
         f"{(t_est + t_upd) / t_fwd:.1f}x a plain forward"),
        ("RSS after build (plain / zo run)",
         f"{mem_plain['base_kb'] / 1024:.0f} / {mem_zo['base_kb'] / 1024:.0f} MiB", ""),
        ("peak RSS plain forward", f"{mem_plain['peak_kb'] / 1024:.0f} MiB",
         f"+{(mem_plain['peak_kb'] - mem_plain['base_kb']) / 1024:.0f} MiB over resident"),
        ("peak RSS ZO step", f"{mem_zo['peak_kb'] / 1024:.0f} MiB",
         f"+{(mem_zo['peak_kb'] - mem_zo['base_kb']) / 1024:.0f} MiB over resident"),
        ("weights (float32)", f"{d * 4 / 2**20:.0f} MiB",
         f"largest tensor {max(p.numel() for p in params) * 4 / 2**20:.0f} MiB"),
    ]
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    print(f"{'measure'.ljust(w1)}  {'value'.rjust(w2)}  note")
    for a, b, c in rows:
        print(f"{a.ljust(w1)}  {b.rjust(w2)}  {c}")


if __name__ == "__main__":
    main()
