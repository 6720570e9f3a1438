"""Secure aggregation: Flower's SecAgg+ protocol over thinwire's transports, so that the server
learns only the mean of a round's updates, never one client's.

Flower's cryptographic pieces (`flwr.common.secure_aggregation`, `flwr.supercore.primitives`):
ECDH key agreement with HKDF, Fernet encryption of the share messages, Shamir sharing. The mask
generator is ChaCha20 keyed by the whole 256-bit secret (`mask_stream`), not Flower's. The stages
are those of Flower's SecAggPlusWorkflow, with every sampled client a neighbour of every other
(Flower's default `num_shares`):

0. setup: each client makes two key pairs and sends the public halves (pk1 for masks, pk2 for
   encryption);
1. share keys: each client gets the public keys of those who answered (U1), Shamir-shares its
   mask seed b and its sk1 with threshold t, and sends one ciphertext per other client;
2. forward: each client gets the ciphertexts addressed to it by those who answered stage 1 (U2)
   and keeps its shares; U2 are its neighbours;
3. train: the client trains as always; its update, in the method's update space
   (`ServerSide.update_space`, the space DP uses), is clipped to ±`secagg_clip_range` per value,
   quantised by stochastic rounding to [0, `secagg_quantization`], followed by its clip count,
   and masked: y = q + PRG(b) + Σ_v ±PRG(KA(sk1, pk1_v)) mod 2^32 (+ where the client's id is
   above v's);
4. unmask: the clients whose masked upload arrived and passed the checks (U3) get U3 and the
   dropped U2 \\ U3; each returns its shares of b for U3 and of sk1 for the dropped, never both
   for one client. From ≥ t shares the server rebuilds every b and every dropped sk1, removes
   the masks, and turns the sum into the mean: Σ q · 2c/T / |U3| − c.

Against a hostile client: each client commits to its mask seed (a hash in its share reply), so a
rebuilt seed is checked, and a sk1 against its pk1; shares beyond the threshold are tried until
one set rebuilds the committed value, and holders of shares that disagree are named
(`corrupt`). An unmasked sum outside the honest range [0, n·T] (an offset added to a masked
vector) fails the round, saying so. A client can still send any in-range value: its influence is
then bounded like an honest client's at the clip range.

Differences from Flower's mod, and why: the mask generator (Flower's `pseudo_rand_gen` keeps 32
bits of the seed, flwrlabs/flower#7522); nothing per client travels in the clear (the clip count
is summed under the masks); the quantiser's stochastic rounding draws from the run's
seeded stream (Flower's uses numpy's global generator), so a run is reproducible and the
in-process runtime computes bit-identically what Flower computes; updates are equal-weighted
(DP's rule), so no weight factor is summed. The mean then goes through the method's own
validation and aggregation as a single reply.

What a hostile server learns: the masked vectors (uniform mod 2^32 to anyone without b), the
sum, and which clients dropped. What the stated error is: each value is off by less than one
quantisation step 2c/T after the mean, plus whatever the clip to ±c removed (counted in the
round record as `secagg_clipped`).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (bytes_to_private_key, bytes_to_public_key, generate_key_pairs,
                                                  private_key_to_bytes, public_key_to_bytes)

from thinwire import secret
from thinwire.config import Config
from thinwire.privacy import SECAGG_MOD_RANGE, update_space
from thinwire.seeding import derive_seed
from thinwire.wire import Payload, PayloadError

STAGES = ("setup", "share", "forward", "unmask")
MASKED = "masked"
MAX_SUBSETS = 4096  # share subsets tried per secret when some shares are corrupt
CONTROL_MAX_BYTES = 64 << 20  # a stage message: keys, shares and ciphertexts for at most a few thousand clients


# --- stage messages: named byte strings in a Payload (decoded with its limits) ---------------

def pack(blobs: dict[str, bytes], **fields: Any) -> bytes:
    return Payload(tensors={k: torch.frombuffer(bytearray(v), dtype=torch.uint8) if v else torch.empty(0, dtype=torch.uint8)
                            for k, v in blobs.items()}, scalars={"fields": json.dumps(fields)}).encode()


def unpack(data: bytes) -> tuple[dict[str, bytes], dict[str, Any]]:
    payload = Payload.decode(data, max_bytes=CONTROL_MAX_BYTES)
    blobs = {}
    for name, t in payload.tensors.items():
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise PayloadError(f"secagg message field {name!r} is not a byte string")
        blobs[name] = t.numpy().tobytes()
    fields = json.loads(str(payload.scalars.get("fields", "{}")))
    if not isinstance(fields, dict):
        raise PayloadError("secagg message fields are not a table")
    return blobs, fields


def _by_client(blobs: dict[str, bytes], prefix: str) -> dict[int, bytes]:
    out = {}
    for name, value in blobs.items():
        head, slash, tail = name.partition("/")
        if head == prefix and slash:
            if not tail.isdigit():
                raise PayloadError(f"secagg message field {name!r} does not name a client")
            out[int(tail)] = value
    return out


# --- client side ------------------------------------------------------------------------------

@dataclass
class SecAggClient:
    """One client's protocol state for one round (kept between the stages' messages)."""

    cid: int
    rnd: int
    threshold: int = 0
    keys: dict[str, bytes] = field(default_factory=dict)  # sk1, pk1, sk2, pk2, seed
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    seed_shares: dict[int, bytes] = field(default_factory=dict)
    sk1_shares: dict[int, bytes] = field(default_factory=dict)
    neighbours: list[int] = field(default_factory=list)
    stage: str = ""

    def encode(self) -> bytes:
        blobs = {**self.keys, **{f"pk1/{c}": k[0] for c, k in self.public.items()},
                 **{f"pk2/{c}": k[1] for c, k in self.public.items()},
                 **{f"b/{c}": s for c, s in self.seed_shares.items()},
                 **{f"sk/{c}": s for c, s in self.sk1_shares.items()}}
        return pack(blobs, cid=self.cid, rnd=self.rnd, threshold=self.threshold, neighbours=self.neighbours,
                    stage=self.stage)

    @classmethod
    def decode(cls, data: bytes) -> SecAggClient:
        blobs, s = unpack(data)
        pk1, pk2 = _by_client(blobs, "pk1"), _by_client(blobs, "pk2")
        return cls(int(s["cid"]), int(s["rnd"]), int(s["threshold"]),
                   {k: v for k, v in blobs.items() if "/" not in k}, {c: (pk1[c], pk2[c]) for c in pk1},
                   _by_client(blobs, "b"), _by_client(blobs, "sk"), [int(c) for c in s["neighbours"]], str(s["stage"]))

    def step(self, stage: str, message: bytes) -> bytes:
        """Answer the server's message of `stage` (stages run in order, once each)."""
        expected = STAGES[STAGES.index(self.stage) + 1] if self.stage in STAGES[:-1] else None
        expected = STAGES[0] if not self.stage else expected
        if stage != expected:
            raise PayloadError(f"secagg stage {stage!r} where {expected!r} was due")
        blobs, scalars = unpack(message)
        reply = getattr(self, f"_{stage}")(blobs, scalars)
        self.stage = stage
        return reply

    def _setup(self, blobs: dict[str, bytes], scalars: dict[str, Any]) -> bytes:
        self.threshold = int(scalars["threshold"])
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        self.keys = {"sk1": private_key_to_bytes(sk1), "pk1": public_key_to_bytes(pk1),
                     "sk2": private_key_to_bytes(sk2), "pk2": public_key_to_bytes(pk2)}
        return pack({"pk1": self.keys["pk1"], "pk2": self.keys["pk2"]})

    def _share(self, blobs: dict[str, bytes], scalars: dict[str, Any]) -> bytes:
        pk1, pk2 = _by_client(blobs, "pk1"), _by_client(blobs, "pk2")
        if pk1.keys() != pk2.keys() or pk1.get(self.cid) != self.keys["pk1"] or pk2.get(self.cid) != self.keys["pk2"]:
            raise PayloadError("secagg: the public keys sent back do not include this client's own")
        every = [*pk1.values(), *pk2.values()]
        if len(set(every)) != len(every):
            raise PayloadError("secagg: two clients share a public key")
        if len(pk1) < self.threshold:
            raise PayloadError(f"secagg: {len(pk1)} clients, fewer than the threshold {self.threshold}")
        self.public = {c: (pk1[c], pk2[c]) for c in sorted(pk1)}
        self.keys["seed"] = os.urandom(32)
        seed_shares = create_shares(self.keys["seed"], self.threshold, len(self.public))
        sk1_shares = create_shares(self.keys["sk1"], self.threshold, len(self.public))
        out = {"commit": commitment(self.keys["seed"])}  # binds the seed its shares must rebuild
        for i, (other, (_, other_pk2)) in enumerate(self.public.items()):
            if other == self.cid:
                self.seed_shares[other], self.sk1_shares[other] = seed_shares[i], sk1_shares[i]
                continue
            key = generate_shared_key(bytes_to_private_key(self.keys["sk2"]), bytes_to_public_key(other_pk2))
            text = share_keys_plaintext_concat(self.cid, other, seed_shares[i], sk1_shares[i])
            out[f"ct/{other}"] = encrypt(key, text)
        return pack(out)

    def _forward(self, blobs: dict[str, bytes], scalars: dict[str, Any]) -> bytes:
        for src, ciphertext in sorted(_by_client(blobs, "ct").items()):
            if src not in self.public or src == self.cid:
                raise PayloadError(f"secagg: a share from client {src}, which did not take part")
            key = generate_shared_key(bytes_to_private_key(self.keys["sk2"]), bytes_to_public_key(self.public[src][1]))
            actual, dst, seed_share, sk1_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
            if actual != src or dst != self.cid:
                raise PayloadError(f"secagg: a share from {actual} to {dst} arrived as from {src} to {self.cid}")
            self.seed_shares[src], self.sk1_shares[src] = seed_share, sk1_share
            self.neighbours.append(src)
        if len(self.neighbours) + 1 < self.threshold:
            raise PayloadError("secagg: fewer neighbours than the threshold")
        return pack({})

    def mask(self, quantized: np.ndarray) -> np.ndarray:
        """q + PRG(b) ± PRG(KA(sk1, pk1_v)) for every neighbour v, mod 2^32 (stage 3)."""
        if self.stage != "forward":
            raise PayloadError(f"secagg: an upload to mask after stage {self.stage!r}")
        size = quantized.size
        masked = quantized.astype(np.int64) + mask_stream(self.keys["seed"], size)
        for other in self.neighbours:
            masked += _sign(self.cid, other) * _pairwise(self.keys["sk1"], self.public[other][0], size)
        return np.mod(masked, SECAGG_MOD_RANGE)

    def _unmask(self, blobs: dict[str, bytes], scalars: dict[str, Any]) -> bytes:
        active, dropped = [int(c) for c in scalars["active"]], [int(c) for c in scalars["dropped"]]
        known = set(self.neighbours) | {self.cid}
        if set(active) & set(dropped) or not set(active) | set(dropped) <= known:
            raise PayloadError("secagg: the unmask request names a client twice or one that took no part")
        if len(active) < self.threshold:
            raise PayloadError(f"secagg: {len(active)} active clients, fewer than the threshold {self.threshold}")
        return pack({**{f"b/{c}": self.seed_shares[c] for c in active},
                     **{f"sk/{c}": self.sk1_shares[c] for c in dropped}})


def commitment(seed: bytes) -> bytes:
    return hashlib.sha256(b"thinwire-secagg-seed\x1f" + seed).digest()


def _public_of(sk1: bytes) -> bytes:
    return public_key_to_bytes(bytes_to_private_key(sk1).public_key())


def _combine(shares: list[bytes]) -> bytes | None:
    """The secret the shares rebuild, or None where they rebuild none (a corrupt share)."""
    try:
        return combine_shares(shares)
    except Exception:  # noqa: BLE001 -- any malformed share: a failed combination, not a failed round
        return None


def _sign(cid: int, other: int) -> int:
    return 1 if cid > other else -1


def mask_stream(key: bytes, size: int) -> np.ndarray:
    """`size` uniform values mod 2^32 from ChaCha20 keyed by the whole secret (Flower's
    `pseudo_rand_gen` folds its seed to 32 bits for numpy's Mersenne Twister: brute-forceable)."""
    return secret.words(key, size, "secagg-mask").astype(np.int64)


def _pairwise(sk1: bytes, other_pk1: bytes, size: int) -> np.ndarray:
    """The mask two clients share: the stream keyed by their agreed key (HKDF over ECDH, 256 bits)."""
    key = generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(other_pk1))
    return mask_stream(base64.urlsafe_b64decode(key), size)


def quantize(values: np.ndarray, clip_range: float, levels: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Flower's quantiser with a seeded generator: clip to ±c, map to [0, T], round stochastically
    (unbiased). Also returns how many values the clip changed."""
    clipped = np.clip(values, -clip_range, clip_range)
    scaled = (clipped + clip_range) * (levels / (2 * clip_range))
    floor = np.floor(scaled)
    q = floor + (rng.random(scaled.shape) < scaled - floor)
    return q.astype(np.int64), int(np.count_nonzero(clipped != values))


def masked_upload(config: Config, rnd: int, cid: int, payload: Payload, state: SecAggClient) -> Payload:
    """The client's upload under SecAgg+: its update in the method's update space, quantised, then
    its clip count as one more integer (so only the round's total is ever seen), all masked; with
    the layout the server needs to rebuild the method's payload from the mean."""
    view = update_space(config).view(payload)
    names = sorted(view)
    flat = np.concatenate([view[n].double().numpy().ravel() for n in names]) if names else np.zeros(0)
    privacy = config.privacy
    rng = np.random.default_rng(derive_seed(config.federation.seed, "secagg-quantize", rnd, cid))
    q, clipped = quantize(flat, privacy.secagg_clip_range, privacy.secagg_quantization, rng)
    masked = state.mask(np.append(q, clipped)).astype(np.uint32).view(np.int32)
    layout = [[n, list(view[n].shape), str(payload.tensors[n].dtype if n in payload.tensors else torch.float32)]
              for n in names]
    return Payload(tensors={MASKED: torch.from_numpy(masked.copy())},
                   scalars={"layout": json.dumps(layout), "scalars": json.dumps(payload.scalars)})


# --- server side ------------------------------------------------------------------------------

Control = Callable[[str, dict[int, bytes]], dict[int, bytes | str]]


@dataclass
class SecureRound:
    """The server's side of one round of SecAgg+. `control(stage, messages)` delivers a stage's
    message to each client and returns its reply bytes, or why there is none."""

    config: Config
    rnd: int
    control: Control
    dimension: int  # values in one update (`UpdateSpace.dimension`)
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # src -> dst -> ciphertext
    commitments: dict[int, bytes] = field(default_factory=dict)  # client -> hash of its mask seed
    corrupt: list[int] = field(default_factory=list)  # clients whose shares rebuilt no committed secret
    threshold: int = 0
    unmasked: list[int] = field(default_factory=list)  # the clients whose updates the mean holds
    bytes_down: int = 0
    bytes_up: int = 0

    def _call(self, stage: str, messages: dict[int, bytes], failures: dict[int, str]) -> dict[int, bytes]:
        self.bytes_down += sum(len(m) for m in messages.values())
        replies = self.control(stage, messages)
        out = {}
        for cid in messages:
            reply = replies.get(cid, "no reply")
            if isinstance(reply, bytes):
                self.bytes_up += len(reply)
                out[cid] = reply
            else:
                failures[cid] = f"secagg {stage}: {reply}"
        return out

    def setup(self, clients: list[int]) -> dict[int, str]:
        """Stages 0-2 with `clients`; returns client -> why it cannot take part this round."""
        failures: dict[int, str] = {}
        self.threshold = max(2, math.ceil(self.config.privacy.secagg_threshold * len(clients)))
        setup = pack({}, threshold=self.threshold)
        for cid, reply in self._call("setup", {c: setup for c in clients}, failures).items():
            try:
                blobs, _ = unpack(reply)
                self.public[cid] = (blobs["pk1"], blobs["pk2"])
            except (PayloadError, KeyError) as exc:
                failures[cid] = f"secagg setup: malformed reply ({exc})"
        keys = pack({**{f"pk1/{c}": k[0] for c, k in self.public.items()},
                     **{f"pk2/{c}": k[1] for c, k in self.public.items()}})
        for cid, reply in self._call("share", {c: keys for c in self.public}, failures).items():
            try:
                blobs = unpack(reply)[0]
                sent = _by_client(blobs, "ct")
                if set(sent) != set(self.public) - {cid}:
                    raise PayloadError("shares for other clients than the round's")
                if len(blobs.get("commit", b"")) != 32:
                    raise PayloadError("no commitment to its mask seed")
                self.ciphertexts[cid], self.commitments[cid] = sent, blobs["commit"]
            except PayloadError as exc:
                failures[cid] = f"secagg share: malformed reply ({exc})"
        forward = {dst: pack({f"ct/{src}": sent[dst] for src, sent in self.ciphertexts.items() if src != dst})
                   for dst in self.ciphertexts}
        acked = self._call("forward", forward, failures)
        for cid in set(self.ciphertexts) - set(acked):
            failures.setdefault(cid, "secagg forward: no reply")
        return failures

    def check(self, payload: Payload) -> None:
        """A masked upload's shape (the method's own checks run on the unmasked mean)."""
        if set(payload.tensors) != {MASKED} or payload.tensors[MASKED].dtype != torch.int32 \
                or payload.tensors[MASKED].dim() != 1:
            raise PayloadError("secagg: an upload must be one int32 vector named 'masked'")
        layout, _ = _layout(payload)
        size = sum(math.prod(dims) for _, dims, _ in layout)
        if not size + 1 == payload.tensors[MASKED].numel() == self.dimension + 1:
            raise PayloadError(f"secagg: the layout holds {size} values and the upload "
                               f"{payload.tensors[MASKED].numel()} (one more: the clip count), where an update "
                               f"has {self.dimension}")

    def upload_cap(self) -> int:
        """Bytes a masked upload may take, checked before decoding: 4 per value, 1 MiB of metadata."""
        return 4 * (self.dimension + 1) + (1 << 20)

    def unmask(self, uploads: dict[int, Payload]) -> tuple[Payload, dict[str, float]]:
        """The mean of `uploads` (the masked uploads that passed `check`), as the method's payload."""
        shape_of = Counter(_layout_key(p) for p in uploads.values()).most_common(1)[0][0]
        active = sorted(c for c, p in uploads.items() if _layout_key(p) == shape_of and c in self.ciphertexts)
        if len(active) < self.threshold:
            raise PayloadError(f"secagg: {len(active)} uploads to unmask, fewer than the threshold {self.threshold}")
        dropped = sorted(set(self.ciphertexts) - set(active))
        self.unmasked = active
        failures: dict[int, str] = {}
        request = pack({}, active=active, dropped=dropped)
        shares: dict[str, dict[int, list[tuple[int, bytes]]]] = {"b": {}, "sk": {}}  # secret -> [(holder, share)]
        for cid, reply in self._call("unmask", {c: request for c in active}, failures).items():
            try:
                blobs, _ = unpack(reply)
                for kind, wanted in (("b", active), ("sk", dropped)):
                    got = _by_client(blobs, kind)
                    for c in wanted:
                        shares[kind].setdefault(c, []).append((cid, got[c]))
            except (PayloadError, KeyError):
                continue  # a bad answer only costs its shares
        total = sum(uploads[c].tensors[MASKED].numpy().view(np.uint32).astype(np.int64) for c in active)
        for cid in active:
            seed = self._rebuild(shares["b"].get(cid, []), f"the mask seed of client {cid}",
                                 lambda b, c=cid: commitment(b) == self.commitments[c])
            total -= mask_stream(seed, total.size)
        for gone in dropped:
            sk1 = self._rebuild(shares["sk"].get(gone, []), f"the key of dropped client {gone}",
                                lambda sk, g=gone: _public_of(sk) == self.public[g][0])
            for cid in active:  # cid added _sign(cid, gone) · PRG(KA(sk1_cid, pk1_gone)): the same key
                total -= _sign(cid, gone) * _pairwise(sk1, self.public[cid][0], total.size)
        summed = np.mod(total, SECAGG_MOD_RANGE)
        privacy = self.config.privacy
        c, levels = privacy.secagg_clip_range, privacy.secagg_quantization
        honest = len(active) * levels  # each quantised value lies in [0, T]; each clip count in [0, d]
        outside = int(np.count_nonzero(summed[:-1] > honest)) + int(summed[-1] > len(active) * (total.size - 1))
        if outside:
            raise PayloadError(f"secagg: the unmasked sum leaves the honest range [0, {honest}] at "
                               f"{outside} values: a client added an offset to its masked upload; round dropped")
        mean = summed[:-1].astype(np.float64) * (2 * c / levels) / len(active) - c
        layout, scalars = _layout(uploads[active[0]])
        view, offset = {}, 0
        for name, dims, dtype in layout:
            size = math.prod(dims)
            view[name] = torch.from_numpy(mean[offset:offset + size].astype(np.float32)).reshape(dims)
            offset += size
        template = Payload(tensors={name: torch.empty(0, dtype=dtype) for name, _, dtype in layout}, scalars=scalars)
        metrics = {"secagg_unmasked": float(len(active)), "secagg_dropped": float(len(dropped)),
                   "secagg_clipped": float(summed[-1]), "secagg_corrupt_shares": float(len(self.corrupt))}
        return update_space(self.config).rebuild(template, view), metrics

    def _rebuild(self, shares: list[tuple[int, bytes]], what: str, valid: Callable[[bytes], bool]) -> bytes:
        """The secret that `threshold` of `shares` rebuild and `valid` accepts (its commitment);
        holders whose share disagrees with it are added to `corrupt`. A corrupt share costs its
        holder's word, never the round, while `threshold` honest shares remain."""
        if len(shares) < self.threshold:
            raise PayloadError(f"secagg: {len(shares)} shares of {what}, fewer than the threshold {self.threshold}")
        for subset in itertools.islice(itertools.combinations(shares, self.threshold), MAX_SUBSETS):
            secret = _combine([share for _, share in subset])
            if secret is not None and valid(secret):
                break
        else:
            raise PayloadError(f"secagg: no {self.threshold} of the {len(shares)} shares of {what} rebuild its "
                               "committed value")
        chosen, trusted = {holder for holder, _ in subset}, [share for _, share in subset[:-1]]
        for holder, share in shares:
            if holder not in chosen and holder not in self.corrupt and _combine([*trusted, share]) != secret:
                self.corrupt.append(holder)
        return secret


def _layout_key(payload: Payload) -> str:
    return json.dumps([payload.scalars["layout"], payload.scalars["scalars"], payload.tensors[MASKED].numel()])


def _layout(payload: Payload) -> tuple[list[tuple[str, list[int], torch.dtype]], dict[str, Any]]:
    """A masked upload's layout [(name, shape, dtype)] and the method payload's own scalars."""
    try:
        layout = [(str(name), [int(d) for d in dims], getattr(torch, str(dtype).removeprefix("torch.")))
                  for name, dims, dtype in json.loads(str(payload.scalars["layout"]))]
        scalars = json.loads(str(payload.scalars["scalars"]))
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise PayloadError(f"secagg: a malformed layout ({type(exc).__name__})") from exc
    if not all(isinstance(dtype, torch.dtype) for _, _, dtype in layout) or not isinstance(scalars, dict):
        raise PayloadError("secagg: a malformed layout")
    return layout, scalars
