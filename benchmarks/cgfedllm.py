"""CG-FedLLM: the paper's literal recipe vs the variant that works, against FedIT and sending nothing.

    python benchmarks/cgfedllm.py                                  # tiny model, ~3 min on 1 CPU thread
    python benchmarks/cgfedllm.py --model smollm2-135m --rounds 5  # reduced SmolLM2 setting (slow on CPU)

Every variant is one `run_local` on the same smoke federation (3 clients by task, 2 per round),
same seed, same local training; only the method options differ:

- fedit: uncompressed FedIT (every round, all data);
- faithful: CG-FedLLM as written: target = state, no normalisation, no scale refit, no error
  feedback, frozen conv2d AE at 1/64, AE lr 2e-4 (mean aggregation: the paper's literal sum of
  states would multiply the adapter by the number of clients);
- working: target = delta, per-tensor scales (least-squares refit), error feedback, conv2d 1/64;
- working-1d: the same with the 1-D chunked AE (1/32);
- working-refine: working with a calibration round (exact uploads, AE fine-tuned) every 2nd FAF round;
- working-c4, working-1d-c16, working-1d-c4: the working pipeline at 1/4, 1/16, 1/4 (conv2d
  with two stride-2 convs; conv1d with four, chunks of 1024);
- topk: the working pipeline with global top-k (int32 positions + fp16 values) instead of an AE, 1/64;
- signs: the same with the scaled signs of a seeded random subset (1 bit each + a scale per tensor), 1/64;
- bits: the working pipeline with the 1-D AE whose latent is one sign bit per two values (depth 1), 1/64
  of the float32 bytes plus the scales;
- zeros-after-tgap: the same TGAP rounds, then nothing sent (isolates what FAF contributes);
- zeros: nothing sent at all (the model stays at its base).

The CG-FedLLM variants spend `tgap_rounds` rounds on TGAP (uncompressed FedIT on 30% of each
client's data, several snapshots per upload); those bytes are counted in `up/cr all`. `up/cr FAF`
is the mean upload of the compressed rounds alone. `down total` includes the AE each client
downloads once. rel/cos/SNR are the clients' own measurements of the codec on what it encoded,
averaged over the FAF rounds; "update" rel/cos/SNR measure the update the server applies (for the
faithful variant start − x̂ against start − x: the honest figure for a state target).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from thinwire.config import EXAMPLES  # noqa: E402
from thinwire.config import load_config  # noqa: E402
from thinwire.runtime.local import run_local  # noqa: E402

FAITHFUL = ["method.cgfedllm.preset='paper'"]  # the paper's recipe (conv2d, state, no scales/EF, ae_lr 2e-4)
# the "working" variants predate CG-FedLLM's presets: the repaired pipeline with float-latent AEs
CONV2D = ["method.cgfedllm.codec='conv2d'"]  # another codec than the default preset's: generic architecture
CONV1D_FLOAT = ["method.cgfedllm.codec='conv1d'", "method.cgfedllm.depth=6", "method.cgfedllm.compression=0",
                "method.cgfedllm.res_blocks=2", "method.cgfedllm.binary_latent=false", "method.cgfedllm.shuffle=false",
                "method.cgfedllm.ae_lr=1e-3", "method.cgfedllm.ae_batch=8"]
VARIANTS = {
    "fedit": ["method.name='fedit'"],
    "faithful": ["method.name='cgfedllm'", *FAITHFUL],
    "working": ["method.name='cgfedllm'", *CONV2D],
    "working-1d": ["method.name='cgfedllm'", *CONV1D_FLOAT],
    "working-refine": ["method.name='cgfedllm'", *CONV2D, "method.cgfedllm.refine_every=2"],
    "working-c4": ["method.name='cgfedllm'", *CONV2D, "method.cgfedllm.depth=2", "method.cgfedllm.compression=4"],
    "working-1d-c16": ["method.name='cgfedllm'", *CONV1D_FLOAT, "method.cgfedllm.depth=4",
                        "method.cgfedllm.compression=16", "method.cgfedllm.chunk=1024"],
    "working-1d-c4": ["method.name='cgfedllm'", *CONV1D_FLOAT, "method.cgfedllm.depth=4",
                       "method.cgfedllm.compression=4", "method.cgfedllm.chunk=1024"],
    "topk": ["method.name='cgfedllm'", "method.cgfedllm.codec='topk'", "method.cgfedllm.latent_dtype='float16'"],
    "signs": ["method.name='cgfedllm'", "method.cgfedllm.codec='signs'"],
    "bits": ["method.name='cgfedllm'", "method.cgfedllm.codec='conv1d'", "method.cgfedllm.depth=1",
             "method.cgfedllm.compression=2", "method.cgfedllm.res_blocks=0", "method.cgfedllm.binary_latent=true",
             "method.cgfedllm.shuffle=false", "method.cgfedllm.ae_lr=1e-2", "method.cgfedllm.ae_batch=8",
             "method.cgfedllm.chunk=1024"],
    "default": ["method.name='cgfedllm'", "method.cgfedllm.chunk=1024"],  # the default preset (bits, shuffled)
    "zeros-after-tgap": ["method.name='cgfedllm'", "method.cgfedllm.codec='zeros'"],
    "zeros": ["method.name='cgfedllm'", "method.cgfedllm.codec='zeros'", "method.cgfedllm.tgap_rounds=0"],
}
SETTINGS = {
    "tiny": ["train.lr=5e-2"],
    # reduced: short sequences, few eval examples, a cheaper AE schedule (one AE step ≈ 1 s per sample on CPU)
    "smollm2-135m": ["model.name='smollm2-135m'", "train.lr=1e-3", "data.max_length=96", "eval.max_examples=16",
                     "data.eval_examples=16", "method.cgfedllm.ae_steps=100", "method.cgfedllm.ae_batch=2",
                     "method.cgfedllm.refine_steps=30"],
}


def summarise(name: str, out: Path, wall: float) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    faf = [r for r in rounds if r["aggregate"].get("phase") == "faf"]
    mean = lambda key: sum(r["aggregate"][key] for r in faf) / len(faf) if faf else None  # noqa: E731
    return {
        "variant": name, "base_loss": summary["base_eval"]["loss"], "final_loss": summary["final_eval"]["loss"],
        "best_loss": min(r["eval"]["loss"] for r in rounds if r.get("eval")),
        "up_all": summary["uplink_bytes_per_client_round"],
        "up_faf": summary["phases"].get("faf", {}).get("uplink_bytes_per_client_round"),
        "down_total": summary["downlink_bytes_total"],
        "rel_err": mean("rel_err"), "cos": mean("cos"), "snr_db": mean("snr_db"),
        "u_rel_err": mean("update_rel_err"), "u_cos": mean("update_cos"), "u_snr_db": mean("update_snr_db"),
        "ae_train_rel_err": next((r["aggregate"]["ae_rel_err"] for r in rounds if "ae_rel_err" in r["aggregate"]), None),
        "wall_s": wall,
    }


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ("| variant | final loss | best loss | up/cr all (B) | up/cr FAF (B) | down total (B) | rel err | cos "
            "| SNR dB | update rel err | update cos | update SNR dB | AE train rel err |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['final_loss']:.3f} | {r['best_loss']:.3f} | {r['up_all']:,.0f} | "
                     f"{fmt(r['up_faf'], ',.0f')} | {r['down_total']:,} | {fmt(r['rel_err'], '.3f')} | "
                     f"{fmt(r['cos'], '.3f')} | {fmt(r['snr_db'], '.2f')} | {fmt(r['u_rel_err'], '.3f')} | "
                     f"{fmt(r['u_cos'], '.3f')} | {fmt(r['u_snr_db'], '.2f')} | {fmt(r['ae_train_rel_err'], '.3f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="tiny")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cgfedllm"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="extra section.key=value overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.variants.split(","):
        out = args.out / args.model / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(name + ".partial"), ignore_errors=True)
        overrides = [f"federation.rounds={args.rounds}", "eval.generate=false", "federation.checkpoint=false",
                     "method.cgfedllm.tgap_rounds=2",
                     *VARIANTS[name], *SETTINGS[args.model], *args.set]  # the setting's AE schedule wins
        if name == "fedit":
            overrides = [o for o in overrides if not o.startswith("method.cgfedllm.")]
        started = time.perf_counter()
        run_local(load_config(EXAMPLES / "smoke.toml", overrides), out, quiet=True)
        rows.append(summarise(name, out, time.perf_counter() - started))
        print(f"{name}: final loss {rows[-1]['final_loss']:.3f} ({rows[-1]['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    print(f"\nCG-FedLLM benchmark: model {args.model}, {args.rounds} rounds, base loss {rows[0]['base_loss']:.3f}\n")
    print(table(rows))
    (args.out / args.model / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
