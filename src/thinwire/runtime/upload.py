"""The envelope of a client's upload, the same on every runtime: what a client does to its
method's payload before it leaves (local DP noise, SecAgg+ masking, a round-and-client stamp) and
what the server checks of the stamp before the method sees the payload.

Why the stamp: a client that replays its upload of an earlier round, or forwards another
client's, would otherwise send a well-formed update the method accepts. The stamp binds an
upload to the round and client it was made for; the engine drops any other as rejected. It does
not authenticate (a hostile client can write any stamp on an update it made up); node
authentication and TLS are Flower's (docs/flower.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from thinwire.privacy import private, privatize_upload
from thinwire.wire import Payload, PayloadError

if TYPE_CHECKING:
    from thinwire.config import Config
    from thinwire.methods.base import ClientState, Upload
    from thinwire.secagg import SecAggClient

ROUND, CLIENT = "thinwire.round", "thinwire.client"
WITHHELD_EXAMPLES = 1  # the example count a client reports under privacy: a label, its weight is equal anyway


def take_roster(download: Payload) -> str | None:
    """Under SecAgg+, the round's roster the server put in the download's scalars (removed, so the
    method sees its own payload); else None."""
    from thinwire.secagg import ROSTER

    roster = download.scalars.pop(ROSTER, None)
    return None if roster is None else str(roster)


def client_upload(config: Config, rnd: int, cid: int, payload: Payload, *, state: ClientState,
                  secure: SecAggClient | None = None, roster: str | None = None) -> bytes:
    """The bytes a client sends after `fit`: its update noised under local DP with the key in its
    `state` (`privatize_upload`), masked under SecAgg+ by its protocol state `secure` for the
    download's `roster`, stamped with (round, client)."""
    payload = privatize_upload(config, rnd, payload, state)
    if config.privacy.secagg:
        from thinwire.secagg import masked_upload

        if secure is None or roster is None:
            raise PayloadError(f"secagg: client {cid} holds no keys or no roster for round {rnd}")
        secure.join(roster)
        if secure.rnd != rnd:
            raise PayloadError(f"secagg: a roster for round {secure.rnd} in round {rnd}")
        payload = masked_upload(config, rnd, cid, payload, secure)
    payload.scalars = stamp(payload.scalars, rnd, cid)
    return payload.encode()


def client_report(config: Config, upload: Upload) -> tuple[int, dict[str, Any]]:
    """What a client tells the server besides its payload: its example count and metrics (training
    loss, tokens, timings), or under DP or SecAgg+ nothing, since no guarantee covers them."""
    if private(config):
        return WITHHELD_EXAMPLES, {}
    return upload.num_examples, upload.metrics


def stamp(scalars: dict, rnd: int, cid: int) -> dict:
    """A payload's scalars with the (round, client) stamp added."""
    return {**scalars, ROUND: rnd, CLIENT: cid}


def open_envelope(payload: Payload, rnd: int, cid: int) -> Payload:
    """The method's payload inside an upload that client `cid` made for round `rnd`; anything else
    (a replay of another round, another client's upload, no stamp) raises PayloadError."""
    stamp = payload.scalars.get(ROUND), payload.scalars.get(CLIENT)
    if stamp != (rnd, cid):
        raise PayloadError(f"upload stamped for round {stamp[0]!r}, client {stamp[1]!r}, not round {rnd}, "
                           f"client {cid} (replayed or forwarded)")
    return Payload(tensors=payload.tensors, scalars={k: v for k, v in payload.scalars.items() if k not in (ROUND, CLIENT)})
