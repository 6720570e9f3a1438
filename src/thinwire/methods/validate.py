"""Checks an upload must pass before it may reach aggregation, and the runtime's screen.

`Payload.decode` has already checked the bytes (format version, header, offsets, lengths, dtypes
it knows, the byte cap). What it cannot know is what the *method* expects; every `ServerSide`
therefore has a `validate(reply)` hook (methods/base.py) that raises `PayloadError` with a
reason, built from the helpers here:

1. `check_reply` (every method): a sane example count (an int: True, 24.9 or "24" are refused on
   every runtime), metrics that are finite numbers of sane magnitude (`check_metric`), the
   upload's tensor bytes under the method's cap;
2. `ServerSide.check_update` (each method): exact tensor names, dtypes and shapes against its own
   state, indices (seeds, block counts) in range, the version and basis round the client must
   have used;
3. `check_finite` (every method): no NaN or ±Inf in any floating tensor, and `check_magnitude`:
   no value (tensor or float scalar) beyond `[method] max_update_value`;
4. the norm bound `[method] max_update_norm` on `ServerSide.update_norm`.

Validation never changes server state; a rejected upload is dropped and logged as
`rejected: [{client, reason}]` in the round record. `screen` is what a runtime calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from thinwire.wire import PayloadError

MAX_REASON = 300
MAX_METRIC = 1e15  # no honest client figure (a loss, a token count) comes near
MAX_SECONDS = 1e7  # a client's duration: four months


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_reply(reply, max_bytes: int, max_examples: int | None = None) -> None:
    """Example count, metrics and size: what every method's upload must satisfy."""
    check_examples(reply.num_examples, max_examples)
    for key, value in (reply.metrics or {}).items():
        check_metric(key, value)
    size = tensor_bytes(reply.payload.tensors)
    if size > max_bytes:
        raise PayloadError(f"upload holds {size} tensor bytes, over the cap of {max_bytes}")


def check_examples(n: object, max_examples: int | None = None) -> int:
    """A claimed example count: an int of at least 1 (never True, 24.9 or "24", on any runtime), and
    at most `max_examples` when given."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PayloadError(f"example count {str(n)[:40]!r} is not a positive integer")
    if max_examples is not None and n > max_examples:
        raise PayloadError(f"example count {n} exceeds the {max_examples} a client can hold "
                           "(federation.max_examples)")
    return n


def check_metric(key: str, value: object) -> None:
    """A client's own figure: a finite number of sane magnitude; a duration (`*_s`, seconds) within
    [-1, `MAX_SECONDS`] (-1: unknown). Records keep it under the client's `metrics`, never as a
    measured field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PayloadError(f"metric {str(key)[:60]!r} = {str(value)[:40]!r} is not a finite number")
    if abs(value) > MAX_METRIC:
        raise PayloadError(f"metric {str(key)[:60]!r} = {value:.3g} is beyond ±{MAX_METRIC:g}")
    if str(key).endswith("_s") and not -1 <= value <= MAX_SECONDS:
        raise PayloadError(f"metric {str(key)[:60]!r} = {value:.3g} s is not a duration in [-1, {MAX_SECONDS:g}]")


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PayloadError(f"tensor {name!r} has non-finite values")


def check_magnitude(payload, bound: float) -> None:
    """No floating tensor value and no numeric scalar of `payload` beyond ±`bound` (0: off).

    Finite is not enough: values near the float32 maximum (3.4e38) overflow the moment they are
    added or squared, so a plausibility bound far above any honest update rejects them here."""
    if bound <= 0:
        return
    for name in sorted(payload.tensors):
        t = payload.tensors[name]
        if t.is_floating_point() and t.numel() and float(t.detach().abs().max()) > bound:
            raise PayloadError(f"tensor {name!r} holds a value of magnitude {float(t.detach().abs().max()):.3g}, "
                               f"over method.max_update_value = {bound:g}")
    for key in sorted(payload.scalars):
        value = payload.scalars[key]
        if isinstance(value, float) and not abs(value) <= bound:
            raise PayloadError(f"scalar {key!r} = {value!r} is not a finite number within ±{bound:g} "
                               "(method.max_update_value)")


def check_names(tensors: Mapping[str, torch.Tensor], expected: Iterable[str]) -> None:
    expected = set(expected)
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise PayloadError(f"tensor names differ: missing {missing[:3]}, unexpected {[e[:60] for e in extra[:3]]}")


def check_tensor(tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype,
                 shape: tuple[int, ...] | None = None, ndim: int | None = None) -> torch.Tensor:
    """`tensors[name]` with exactly this dtype, and this shape (or number of dimensions)."""
    if name not in tensors:
        raise PayloadError(f"tensor {name!r} is missing")
    t = tensors[name]
    if t.dtype != dtype:
        raise PayloadError(f"tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise PayloadError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if ndim is not None and t.dim() != ndim:
        raise PayloadError(f"tensor {name!r} has {t.dim()} dimensions, expected {ndim}")
    return t


def check_like(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Same names, shapes and dtypes as `reference`."""
    check_names(tensors, reference)
    for name in sorted(reference):
        check_tensor(tensors, name, reference[name].dtype, shape=tuple(reference[name].shape))


def check_indices(t: torch.Tensor, name: str, size: int, unique: bool = False) -> None:
    """Integer entries in [0, size) (and pairwise different if `unique`)."""
    if t.numel() == 0:
        return
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= size:
        raise PayloadError(f"tensor {name!r} has an index outside [0, {size}): {low if low < 0 else high}")
    if unique and torch.unique(t).numel() != t.numel():
        raise PayloadError(f"tensor {name!r} repeats an index")


def int_scalar(scalars: Mapping[str, object], key: str, expected: int | None = None) -> int:
    """Scalar `key` as an int (and equal to `expected` when given)."""
    value = scalars.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"scalar {key!r} is missing or not an integer: {str(value)[:40]!r}")
    if expected is not None and value != expected:
        raise PayloadError(f"scalar {key!r} = {value}, expected {expected}")
    return value


def reason(exc: BaseException) -> str:
    """One line for the round record."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text[:MAX_REASON]


def rejection(exc: BaseException) -> str:
    """Why an upload was rejected: the PayloadError's reason, or any other failure named by type."""
    return reason(exc) if isinstance(exc, PayloadError) else f"{type(exc).__name__}: {reason(exc)}"[:MAX_REASON]


def screen(server, replies: list) -> tuple[list, list[dict]]:
    """Split replies into those `server.validate` accepts and `[{client, reason}]` for the rest."""
    accepted, rejected = [], []
    for reply in replies:
        try:
            server.validate(reply)
        except PayloadError as exc:
            rejected.append({"client": reply.client_id, "reason": reason(exc)})
        else:
            accepted.append(reply)
    return accepted, rejected
