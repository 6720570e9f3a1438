"""SecAgg+'s cost against a plain run of the same work: bytes and seconds per round, and how far
the final weights moved (the quantisation error), on a loopback deployment or flower-sim.

    python benchmarks/secagg.py --methods fedavg,ferret --runtime loopback
    python benchmarks/secagg.py --methods fedavg,fedit,ferret,fedkseed --runtime flower-sim

Each method runs `examples/smoke.toml` twice with equal weighting (SecAgg's rule), plain and with
`privacy.secagg = true`. Loopback: a SuperLink and one SuperNode per client on 127.0.0.1
(insecure), every message served by a fresh ClientApp process, as in a deployment. The table
gives payload bytes per client-round, the control messages' bytes (key setup, unmask) per
client-round, Flower's own bytes (framing included) per round, mean round time, and the largest
weight difference from the plain run against one quantisation step 2c/T. Keys are set up in a
client's first round, so "after round 1" (the mean round time from round 2 on) is the steady
cost, and "× plain" its ratio to the plain run's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from thinwire.config import EXAMPLES, load_config
from thinwire.runtime import deploy, flower
from thinwire.runtime.display import human_bytes

REPO = Path(__file__).resolve().parents[1]  # the Flower app (pyproject.toml's [tool.flwr.app])
CLIENTS = 3  # examples/smoke.toml


@contextlib.contextmanager
def loopback(work: Path) -> Iterator[Path]:
    """A SuperLink and one SuperNode per client on 127.0.0.1; yields Flower's home directory."""
    home, logs = work / "flwr-home", work / "logs"
    logs.mkdir(parents=True)
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
           "THINWIRE_REPLICAS": str(work / "replicas")}
    port = deploy.free_port()
    processes = [deploy.start_superlink(port=port, flwr_home=home, insecure=True, log=logs / "superlink.log",
                                        cwd=work, env=env)]
    try:
        deploy.wait_for_port("127.0.0.1", port, timeout=60, process=processes[0])
        for i in range(CLIENTS):
            processes.append(deploy.start_supernode(f"127.0.0.1:{port}", i, CLIENTS, port=deploy.free_port(),
                                                    flwr_home=home, insecure=True, log=logs / f"supernode{i}.log",
                                                    cwd=work, env=env))
        deploy.write_connection("loopback", f"127.0.0.1:{port}", flwr_home=home, insecure=True)
        yield home
    finally:
        deploy.stop(*processes)


def run(runtime: str, overrides: list[str], out: Path, home: Path | None) -> None:
    if runtime == "flower-sim":
        flower.run_flower_sim(load_config(EXAMPLES / "smoke.toml", overrides), out, quiet=True, num_cpus=1)
        return
    result = deploy.submit(REPO, "loopback", {"config": "smoke.toml", "set": ";".join(overrides), "out": str(out)},
                           flwr_home=home, timeout=1800)
    if not (out / "summary.json").is_file():
        raise SystemExit(f"flwr run exited {result.returncode}: {result.stderr[-2000:]}")


def figures(out: Path) -> dict[str, float]:
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    contacted = sum(r["clients_contacted"] for r in rounds)
    return {
        "up": sum(r["uplink_bytes"] for r in rounds) / contacted,
        "down": sum(r["downlink_bytes"] for r in rounds) / contacted,
        "stages": sum(r.get("secagg_downlink_bytes", 0) + r.get("secagg_uplink_bytes", 0) for r in rounds) / contacted,
        "flower": statistics.mean(r["flower_downlink_bytes"] + r["flower_uplink_bytes"] + r["flower_control_bytes"]
                                  for r in rounds),
        "round_s": statistics.mean(r["time_s"]["total"] for r in rounds),
        "later_round_s": statistics.mean(r["time_s"]["total"] for r in rounds[1:]) if len(rounds) > 1 else math.nan,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="fedavg,ferret")
    ap.add_argument("--runtime", default="loopback", choices=("loopback", "flower-sim"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    ap.add_argument("--out", type=Path, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    table = Table(title=f"SecAgg+ against a plain run ({args.runtime}, smoke work, {args.rounds} rounds)")
    for column in ("method", "run", "up / client-round", "down / client-round", "control / client-round",
                   "Flower bytes / round", "round time", "after round 1", "× plain", "max |Δw| vs plain",
                   "one step 2c/T"):
        table.add_column(column, justify="left" if column in ("method", "run") else "right")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.out or Path(scratch)
        with loopback(work / "federation") if args.runtime == "loopback" else contextlib.nullcontext() as home:
            for method in args.methods.split(","):
                base = [f"method.name='{method}'", "method.weighting='equal'", "eval.generate=false",
                        f"federation.rounds={args.rounds}", *args.overrides]
                plain_dir, secure_dir = work / f"{method}-plain", work / f"{method}-secagg"
                run(args.runtime, base, plain_dir, home)
                run(args.runtime, [*base, "privacy.secagg=true"], secure_dir, home)
                privacy = load_config(EXAMPLES / "smoke.toml", [*base, "privacy.secagg=true"]).privacy
                plain, secure = (load_file(d / "final_state.safetensors") for d in (plain_dir, secure_dir))
                gap = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in plain)
                base_s = figures(plain_dir)["later_round_s"]
                for label, out in (("plain", plain_dir), ("SecAgg+", secure_dir)):
                    f = figures(out)
                    table.add_row(method, label, human_bytes(f["up"]), human_bytes(f["down"]),
                                  human_bytes(f["stages"]) if f["stages"] else "-", human_bytes(f["flower"]),
                                  f"{f['round_s']:.1f} s", f"{f['later_round_s']:.1f} s",
                                  f"{f['later_round_s'] / base_s:.2f}", f"{gap:.2e}" if label != "plain" else "-",
                                  f"{2 * privacy.secagg_clip_range / privacy.secagg_quantization:.2e}")
    Console().print(table)


if __name__ == "__main__":
    main()
