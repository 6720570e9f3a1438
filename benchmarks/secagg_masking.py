"""SecAgg+'s masking and unmasking at model scale: seconds and peak memory of one client's
quantise-and-mask and of the server's unmask, for an update of SmolLM2-135M's size (FedAvg's
134,515,008 values) by default, with thinwire's ChaCha20 mask generator against Flower's
`pseudo_rand_gen` (numpy's Mersenne Twister on a 32-bit seed) measured in the same run.

    python benchmarks/secagg_masking.py [--dimension 134515008] [--clients 4] [--dropped 1]

The protocol runs in process (SecAggClient and SecureRound, as the runtimes drive them); the key
stages' cost is small and independent of the dimension. Peak memory is tracemalloc's peak over
the step (numpy's buffers included), beyond the inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import tracemalloc
from collections.abc import Iterator

import numpy as np
import torch
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from rich.console import Console
from rich.table import Table

from thinwire import secagg
from thinwire.config import EXAMPLES, load_config
from thinwire.privacy import SECAGG_MOD_RANGE
from thinwire.secagg import SecAggClient, SecureRound
from thinwire.wire import Payload


@contextlib.contextmanager
def measured(into: dict[str, float]) -> Iterator[None]:
    tracemalloc.start()
    start = time.perf_counter()
    yield
    into["s"] = time.perf_counter() - start
    into["peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()


def flower_add_mask(acc: np.ndarray, key: bytes, sign: int = 1) -> None:
    """What thinwire's masking did with Flower's generator: the whole stream, then one add."""
    acc += sign * pseudo_rand_gen(key, SECAGG_MOD_RANGE, [(acc.size,)])[0]


def one_round(dimension: int, clients: int, dropped: int) -> tuple[dict[str, float], dict[str, float]]:
    config = load_config(EXAMPLES / "smoke.toml", ["privacy.secagg=true", f"federation.clients={clients}",
                                                   f"federation.clients_per_round={clients}"])
    states: dict[int, SecAggClient] = {}

    def control(stage: str, messages: dict[int, bytes]) -> dict[int, bytes | str]:
        for cid in messages:
            states.setdefault(cid, SecAggClient(cid))
        return {cid: states[cid].step(stage, message) for cid, message in messages.items()}

    server = SecureRound(config, 1, 0, control, dimension)
    server.setup(list(range(clients)))
    roster = server.roster()
    values = np.random.default_rng(0).normal(0, 1e-3, dimension)
    privacy = config.privacy
    client, unmask, uploads = {}, {}, {}
    for cid in range(clients - dropped):
        states[cid].join(roster)
        quantized, clipped = secagg.quantize(values, privacy.secagg_clip_range, privacy.secagg_quantization,
                                             np.random.default_rng(cid))
        with measured(client) if cid == 0 else contextlib.nullcontext():
            masked, blobs = states[cid].mask(np.append(quantized, clipped))
        tensors = {secagg.MASKED: torch.from_numpy(masked.astype(np.uint32).view(np.int32)),
                   **{name: secagg.byte_tensor(blob) for name, blob in blobs.items()}}
        uploads[cid] = Payload(tensors=tensors, scalars={"layout": f'[["w", [{dimension}], "torch.float32"]]',
                                                         "scalars": "{}"})
        server.check(cid, uploads[cid])
        del quantized, masked
    with measured(unmask):
        server.unmask(uploads)
    return client, unmask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dimension", type=int, default=134_515_008)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--dropped", type=int, default=1, help="clients that share keys, then never upload")
    args = ap.parse_args()
    table = Table(title=f"SecAgg+ at {args.dimension:,} values, {args.clients} clients ({args.dropped} dropped)")
    for column in ("mask generator", "client mask s", "client peak MB", "server unmask s", "server peak MB"):
        table.add_column(column, justify="left" if column == "mask generator" else "right")
    ours = secagg.add_mask
    for name, add in (("Flower pseudo_rand_gen (32-bit seed)", flower_add_mask), ("thinwire ChaCha20", ours)):
        secagg.add_mask = add
        try:
            client, unmask = one_round(args.dimension, args.clients, args.dropped)
        finally:
            secagg.add_mask = ours
        table.add_row(name, f"{client['s']:.2f}", f"{client['peak_mb']:.0f}", f"{unmask['s']:.2f}",
                      f"{unmask['peak_mb']:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
