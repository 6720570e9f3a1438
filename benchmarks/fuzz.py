"""Fuzz the server's intake at scale: structure-aware mutated uploads of every method through
`Payload.decode` and `server.validate`, counting crashes (anything but PayloadError: must be 0)
and timing decoding per MB. The mutations are those of the fuzz test (thinwire/fuzz.py): bit
flips, truncation, header edits with deep nesting and 5,000-digit integers, re-encoded content
with NaN, huge norms, wrong names, shapes, dtypes, indices and scalars.

    python benchmarks/fuzz.py                  # 105,000 payloads (15,000 per method), a few minutes
    python benchmarks/fuzz.py --per-method 2000
"""

from __future__ import annotations

import argparse
import random
import time

from rich.console import Console
from rich.table import Table

from thinwire.config import EXAMPLES, load_config
from thinwire.fuzz import FUZZ_SETTINGS, mutant, target
from thinwire.methods.base import Reply
from thinwire.wire import Payload, PayloadError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-method", type=int, default=15_000)
    args = ap.parse_args()
    table = Table(title=f"fuzzed uploads, {args.per_method:,} per method")
    for col in ("method", "payloads", "rejected", "accepted", "crashes", "MB decoded", "decode MB/s",
                "validate µs / payload"):
        table.add_column(col, justify="right")
    total = crashes_total = 0
    for method, overrides in FUZZ_SETTINGS.items():
        server, uploads = target(load_config(EXAMPLES / "smoke.toml", overrides))
        cap = server.max_upload_bytes() + (1 << 20)
        rng = random.Random(f"fuzz-benchmark-{method}")
        rejected = accepted = crashes = 0
        decoded_bytes, decode_s, validate_s = 0, 0.0, 0.0
        for i in range(args.per_method):
            cid, data, examples, metrics = uploads[i % len(uploads)]
            mutated = mutant(data, method, rng)
            try:
                t0 = time.perf_counter()
                payload = Payload.decode(mutated, max_bytes=cap)
                decode_s += time.perf_counter() - t0
                decoded_bytes += len(mutated)
                t0 = time.perf_counter()
                server.validate(Reply(cid, payload, examples, metrics))
                validate_s += time.perf_counter() - t0
                accepted += 1
            except PayloadError:
                rejected += 1
            except Exception:  # noqa: BLE001 -- anything else is a bug: counted, never hidden
                crashes += 1
        total += args.per_method
        crashes_total += crashes
        table.add_row(method, f"{args.per_method:,}", f"{rejected:,}", f"{accepted:,}", str(crashes),
                      f"{decoded_bytes / 1e6:.1f}", f"{decoded_bytes / 1e6 / max(decode_s, 1e-9):.0f}",
                      f"{validate_s / max(accepted, 1) * 1e6:.0f}")
    Console(width=130).print(table)
    print(f"{total:,} payloads, {crashes_total} crashes")


if __name__ == "__main__":
    main()
