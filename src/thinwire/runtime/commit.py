"""Aggregate a round so that the server never commits a model it cannot use.

Validation (methods/validate.py) bounds each upload on its own; what it cannot see is the round as
a whole. `commit_round` therefore:

1. sets the round's adaptive norm bound from the accepted replies (`ServerSide.bound_round`,
   bounded-mean only) so that the method clips each update to it;
2. keeps a copy of the server's state, aggregates, and checks that every floating tensor of the
   new state is finite;
3. if aggregation raised or left a non-finite value (a hostile update that passed every per-upload
   check, or FedPT's distillation diverging on it), restores the copy and tries again without the
   reply with the largest update norm, and so on: the dropped client is logged with the reason,
   and a round that no reply can be aggregated from commits nothing. If no subset of the replies
   aggregates and no failure was a `PayloadError` or a non-finite model (nothing points at what
   the clients sent), the first error is raised: a bug or a fault of the server, as a power cut.

So nothing a client sends can raise out of aggregation, and a checkpoint (written after the
round) never holds a model that failed the check. A method whose `state_dict()` is None cannot be
restored: its failures propagate as before.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from thinwire.errors import UsageError
from thinwire.methods.base import Reply, ServerSide
from thinwire.methods.validate import rejection
from thinwire.wire import Payload, PayloadError


class NonFiniteModel(ValueError):
    """Aggregation left a NaN or ±Inf in the server's state."""


@dataclass
class Commit:
    """What a round's aggregation committed: its metrics, the replies in it, and those dropped."""

    metrics: dict[str, Any] = field(default_factory=dict)
    replies: list[Reply] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # [{client, reason}]
    norms: dict[int, float] = field(default_factory=dict)  # the server's measured update norm per client


def commit_round(server: ServerSide, rnd: int, replies: list[Reply]) -> Commit:
    """Aggregate `replies` into `server`, dropping (largest update norm first) any whose presence
    makes aggregation fail or the state non-finite; see the module docstring."""
    saved = _copy(server.state_dict())
    remaining, dropped, errors = list(replies), [], []
    while remaining:
        norms = server.bound_round(remaining)
        try:
            metrics = server.aggregate(rnd, remaining)
            check_state_finite(server)
        except UsageError:  # a setting found wrong late: the operator's to fix, whatever the clients sent
            raise
        except Exception as exc:  # a hostile update that passed validation: its sender pays, not the run
            if saved is None:
                raise
            errors.append(exc)
            server.load_state_dict(_copy(saved))
            sizes = norms or {r.client_id: _norm(server, r) for r in remaining}  # other rules: measured here
            offender = max(remaining, key=lambda r: sizes[r.client_id])
            dropped.append({"client": offender.client_id,
                            "reason": f"aggregate not applied: {rejection(exc)}; dropped the largest update"})
            remaining.remove(offender)
            continue
        if server.round_norm_bound is not None:
            metrics["norm_bound"] = server.round_norm_bound
        return Commit(metrics, remaining, dropped, norms)
    server.bound_round([])
    if errors and not any(isinstance(e, (PayloadError, NonFiniteModel)) for e in errors):
        raise errors[0]  # no subset of the replies aggregates, and nothing points at their content: a fault
    return Commit({}, [], dropped, {})


def check_state_finite(server: ServerSide) -> None:
    """Raise `NonFiniteModel` naming the first tensor of the server's state holding NaN or ±Inf."""
    state = server.state_dict() or server.final_state()
    for name in sorted(state.tensors):
        t = state.tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteModel(f"the aggregated model's tensor {name[:80]!r} is not finite")


def _copy(state: Payload | None) -> Payload | None:
    if state is None:
        return None
    return Payload(tensors={k: t.detach().clone() for k, t in state.tensors.items()},
                   scalars=copy.deepcopy(state.scalars))


def _norm(server: ServerSide, reply: Reply) -> float:
    """The reply's update norm for ordering: one that cannot be measured, or is NaN, goes first."""
    try:
        norm = server.update_norm(reply)
    except Exception:  # noqa: BLE001 -- any failure to measure marks the reply as the likely culprit
        return math.inf
    return math.inf if math.isnan(norm) else norm
