"""Secure aggregation: SecAgg+ over thinwire's transports, so that the server learns only the mean
of a round's updates, never one client's, at the cost of one extra message round trip per round.

Flower's cryptographic pieces (`flwr.common.secure_aggregation`, `flwr.supercore.primitives`):
ECDH key agreement with HKDF, Fernet encryption, Shamir sharing. Masks are ChaCha20 streams keyed
by a whole 256-bit secret (`mask_stream`); Flower's `pseudo_rand_gen` keeps 32 bits of its seed
(flwrlabs/flower#7522). Every member of a round is a neighbour of every other.

- Keys, once per run: a client's first round under SecAgg+ starts with a `setup` message; it
  makes two key pairs (sk1/pk1 for masks, sk2/pk2 for encryption), keeps them in its state and
  answers with the public halves, which the server keeps for the run.
- The round's roster travels inside each member's download (`ROSTER`): the round, the attempt,
  the threshold t and every member's public keys.
- With its upload a client draws a fresh round seed b, Shamir-shares it with threshold t among
  the members, encrypts each share to its member (under their agreed pk2 key, bound to the round
  and attempt), and commits to b and to its pairwise round keys (hashes). Its update, in the
  method's update space, is clipped to ±`secagg_clip_range`, quantised to [0, T], followed by its
  clip count, and masked: y = q + PRG(b) + Σ_v ±PRG(k_uv), where k_uv is derived from the run's
  agreed pk1 key and (round, attempt), + where u's id is above v's.
- Unmask, the one extra round trip: each member whose upload arrived and passed the checks (the
  active ones) gets the list of active and dropped members and the ciphertexts addressed to it;
  it returns its shares of b for the active and its pairwise round keys with the dropped, never
  both for one member. From ≥ t shares (checked against the commitment) the server rebuilds
  every active b; with the dropped members' pairwise round keys (checked likewise) it cancels
  their masks; the sum becomes the mean Σ q · 2c/T / |active| − c.

Why round keys: a dropped member's masks are cancelled with keys that serve that round and
attempt only, so no long-term secret is ever revealed and nobody needs to re-key. To unmask one
member u, a server would need t shares of b_u from members told u is active and every pairwise
key of u from members told u dropped: two disjoint sets, the second all of u's neighbours, so an
inconsistent server gets at most u's own share of b_u (t ≥ 2).

Against a hostile client: shares beyond the threshold are tried until a set rebuilds the
committed b; holders of disagreeing shares are named (`corrupt`). A wrong pairwise round key is
caught by its commitment and fails the round, naming the client. An unmasked sum outside the
honest range [0, n·T] (an offset added to a masked vector) fails the round, saying so. A client
can still send any in-range value: its influence is then bounded like an honest client's at the
clip range.

Differences from Flower's mod, and why: the mask generator; keys once per run and shares inside
the upload (Flower's protocol has four message round trips a round, this one); nothing per
client in the clear (the clip count is summed under the masks); the quantiser's stochastic
rounding draws from the run's seeded stream, so the in-process runtime computes bit-identically
what Flower computes; updates are equal-weighted (DP's rule), so no weight factor is summed.
The mean goes through the method's own validation and aggregation as a single reply.

What a hostile server learns: the masked vectors (uniform mod 2^32 to anyone without b), the sum,
and which members dropped. The error: each value is off by less than one quantisation step 2c/T
after the mean, plus whatever the clip to ±c removed (`secagg_clipped` in the round record).
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
from flwr.supercore.primitives.asymmetric import (bytes_to_private_key, bytes_to_public_key, generate_key_pairs,
                                                  private_key_to_bytes, public_key_to_bytes)

from thinwire import secret
from thinwire.config import Config
from thinwire.privacy import SECAGG_MOD_RANGE, update_space
from thinwire.seeding import derive_seed
from thinwire.wire import Payload, PayloadError

STAGES = ("setup", "unmask")  # the control messages (`Transport.control`)
ROSTER = "thinwire.secagg"  # the round's roster, a scalar of each member's download
MASKED = "masked"
MASK_CHUNK = 1 << 20  # mask values generated at a time
MAX_SUBSETS = 4096  # share subsets tried per secret when some shares are corrupt
CONTROL_MAX_BYTES = 64 << 20  # a stage message: keys, shares and ciphertexts for at most a few thousand clients


# --- stage messages: named byte strings in a Payload (decoded with its limits) ---------------

def byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def tensor_bytes(tensors: dict[str, torch.Tensor], name: str) -> bytes:
    t = tensors[name]
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise PayloadError(f"secagg field {name!r} is not a byte string")
    return t.numpy().tobytes()


def pack(blobs: dict[str, bytes], **fields: Any) -> bytes:
    return Payload(tensors={k: byte_tensor(v) for k, v in blobs.items()},
                   scalars={"fields": json.dumps(fields)}).encode()


def unpack(data: bytes) -> tuple[dict[str, bytes], dict[str, Any]]:
    payload = Payload.decode(data, max_bytes=CONTROL_MAX_BYTES)
    blobs = {name: tensor_bytes(payload.tensors, name) for name in payload.tensors}
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




def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- client side ------------------------------------------------------------------------------

@dataclass
class SecAggClient:
    """One client's protocol state: its keys for the run, and the round it is in. Kept between
    messages (in process, or as bytes in Flower's Context.state)."""

    cid: int
    keys: dict[str, bytes] = field(default_factory=dict)  # sk1, pk1, sk2, pk2
    rnd: int = 0
    attempt: int = 0
    threshold: int = 0
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # the round's members: pk1, pk2
    own_share: bytes = b""  # its share of its own round seed
    stage: str = ""  # "", "joined" (holds a roster), "masked" (uploaded), "unmasked"

    def encode(self) -> bytes:
        blobs = {**self.keys, "own_share": self.own_share, **{f"pk1/{c}": k[0] for c, k in self.public.items()},
                 **{f"pk2/{c}": k[1] for c, k in self.public.items()}}
        return pack(blobs, cid=self.cid, rnd=self.rnd, attempt=self.attempt, threshold=self.threshold,
                    stage=self.stage)

    @classmethod
    def decode(cls, data: bytes) -> SecAggClient:
        blobs, s = unpack(data)
        pk1, pk2 = _by_client(blobs, "pk1"), _by_client(blobs, "pk2")
        keys = {k: blobs[k] for k in ("sk1", "pk1", "sk2", "pk2") if k in blobs}
        return cls(int(s["cid"]), keys, int(s["rnd"]), int(s["attempt"]), int(s["threshold"]),
                   {c: (pk1[c], pk2[c]) for c in pk1}, blobs.get("own_share", b""), str(s["stage"]))

    def step(self, stage: str, message: bytes) -> bytes:
        """Answer a control message (`STAGES`)."""
        if stage not in STAGES:
            raise PayloadError(f"secagg: unknown stage {stage!r}")
        blobs, fields = unpack(message)
        return self.setup() if stage == "setup" else self.unmask(blobs, fields)

    def setup(self) -> bytes:
        """New key pairs for the run; the reply holds their public halves."""
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        self.keys = {"sk1": private_key_to_bytes(sk1), "pk1": public_key_to_bytes(pk1),
                     "sk2": private_key_to_bytes(sk2), "pk2": public_key_to_bytes(pk2)}
        self.stage = ""
        return pack({"pk1": self.keys["pk1"], "pk2": self.keys["pk2"]})

    def join(self, roster: str) -> None:
        """Adopt the round's roster from the download (`SecureRound.roster`)."""
        try:
            fields = json.loads(roster)
            members = {int(c): (base64.b64decode(k1), base64.b64decode(k2)) for c, (k1, k2) in fields["members"].items()}
            rnd, attempt, threshold = int(fields["round"]), int(fields["attempt"]), int(fields["threshold"])
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
            raise PayloadError(f"secagg: a malformed roster ({type(exc).__name__})") from exc
        if not self.keys or members.get(self.cid) != (self.keys["pk1"], self.keys["pk2"]):
            raise PayloadError("secagg: the roster does not hold this client's keys (its state was lost: re-key)")
        every = [k for pair in members.values() for k in pair]
        if len(set(every)) != len(every):
            raise PayloadError("secagg: two members share a public key")
        if not 2 <= threshold <= len(members):
            raise PayloadError(f"secagg: threshold {threshold} for {len(members)} members")
        self.rnd, self.attempt, self.threshold, self.public = rnd, attempt, threshold, dict(sorted(members.items()))
        self.stage = "joined"

    def round_key(self, other: int) -> bytes:
        """The mask key this client shares with `other` for this round and attempt only."""
        agreed = generate_shared_key(bytes_to_private_key(self.keys["sk1"]), bytes_to_public_key(self.public[other][0]))
        return hashlib.blake2b(f"{self.rnd}\x1f{self.attempt}".encode(), key=base64.urlsafe_b64decode(agreed),
                               digest_size=32).digest()

    def _box(self, other: int) -> bytes:
        return generate_shared_key(bytes_to_private_key(self.keys["sk2"]), bytes_to_public_key(self.public[other][1]))

    def mask(self, quantized: np.ndarray) -> tuple[np.ndarray, dict[str, bytes]]:
        """y = q + PRG(b) ± PRG(k_uv) mod 2^32, and what travels with it: one encrypted share of b
        per member and the commitments (to b, then to each round key, in member order)."""
        if self.stage != "joined":
            raise PayloadError(f"secagg: an upload to mask at stage {self.stage!r} (no roster for this round)")
        seed = os.urandom(32)
        others = [c for c in self.public if c != self.cid]
        shares = dict(zip(self.public, create_shares(seed, self.threshold, len(self.public))))
        self.own_share = shares[self.cid]
        blobs = {f"ct/{other}": encrypt(self._box(other), pack({"share": shares[other]}, src=self.cid, dst=other,
                                                              rnd=self.rnd, attempt=self.attempt))
                 for other in others}
        keys = {other: self.round_key(other) for other in others}
        blobs["commit"] = commitment(seed) + b"".join(commitment(keys[other]) for other in others)
        masked = quantized.astype(np.int64)
        add_mask(masked, seed)
        for other in others:
            add_mask(masked, keys[other], _sign(self.cid, other))
        self.stage = "masked"
        return np.mod(masked, SECAGG_MOD_RANGE, out=masked), blobs

    def unmask(self, blobs: dict[str, bytes], fields: dict[str, Any]) -> bytes:
        """Shares of b for the active members, round keys with the dropped, never both for one."""
        if self.stage != "masked":
            raise PayloadError(f"secagg: an unmask request at stage {self.stage!r}")
        active, dropped = [int(c) for c in fields["active"]], [int(c) for c in fields["dropped"]]
        if (int(fields["round"]), int(fields["attempt"])) != (self.rnd, self.attempt):
            raise PayloadError("secagg: an unmask request for another round")
        if set(active) & set(dropped) or not set(active) | set(dropped) <= set(self.public) or self.cid not in active:
            raise PayloadError("secagg: the unmask request names a member twice or one outside the round")
        if len(active) < self.threshold:
            raise PayloadError(f"secagg: {len(active)} active members, fewer than the threshold {self.threshold}")
        out = {f"b/{self.cid}": self.own_share}
        for src, ciphertext in sorted(_by_client(blobs, "ct").items()):
            if src not in active or src == self.cid:
                raise PayloadError(f"secagg: a share from member {src}, which is not active")
            share, meta = unpack(decrypt(self._box(src), ciphertext))
            if (meta["src"], meta["dst"], meta["rnd"], meta["attempt"]) != (src, self.cid, self.rnd, self.attempt):
                raise PayloadError(f"secagg: a share addressed otherwise arrived as from {src}")
            out[f"b/{src}"] = share["share"]
        out.update({f"key/{gone}": self.round_key(gone) for gone in dropped})
        self.stage = "unmasked"
        return pack(out)


def commitment(secret_value: bytes) -> bytes:
    return hashlib.sha256(b"thinwire-secagg-commitment\x1f" + secret_value).digest()


def _combine(shares: list[bytes]) -> bytes | None:
    """The secret the shares rebuild, or None where they rebuild none (a corrupt share)."""
    try:
        return combine_shares(shares)
    except Exception:  # noqa: BLE001 -- any malformed share: a failed combination, not a failed round
        return None


def _sign(cid: int, other: int) -> int:
    return 1 if cid > other else -1


def add_mask(acc: np.ndarray, key: bytes, sign: int = 1) -> None:
    """acc (int64) += sign · PRG(key), where PRG is ChaCha20 keyed by the whole secret giving
    uniform values mod 2^32; in place, a chunk at a time, so no model-sized stream is ever held."""
    stream, zeros = secret.keystream(key, "secagg-mask"), bytes(4 * MASK_CHUNK)
    for start in range(0, acc.size, MASK_CHUNK):
        n = min(MASK_CHUNK, acc.size - start)
        words = np.frombuffer(stream.update(memoryview(zeros)[: 4 * n]), dtype=np.uint32)
        if sign > 0:
            acc[start:start + n] += words
        else:
            acc[start:start + n] -= words


def mask_stream(key: bytes, size: int) -> np.ndarray:
    """The first `size` values of PRG(key) (what `add_mask` adds)."""
    out = np.zeros(size, dtype=np.int64)
    add_mask(out, key)
    return out


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
    its clip count as one more integer (so only the round's total is ever seen), all masked; its
    encrypted shares and commitments; the layout the server needs to rebuild the method's payload."""
    view = update_space(config).view(payload)
    names = sorted(view)
    flat = np.concatenate([view[n].double().numpy().ravel() for n in names]) if names else np.zeros(0)
    privacy = config.privacy
    rng = np.random.default_rng(derive_seed(config.federation.seed, "secagg-quantize", rnd, cid))
    q, clipped = quantize(flat, privacy.secagg_clip_range, privacy.secagg_quantization, rng)
    masked, blobs = state.mask(np.append(q, clipped))
    layout = [[n, list(view[n].shape), str(payload.tensors[n].dtype if n in payload.tensors else torch.float32)]
              for n in names]
    tensors = {MASKED: torch.from_numpy(masked.astype(np.uint32).view(np.int32).copy()),
               **{name: byte_tensor(blob) for name, blob in blobs.items()}}
    return Payload(tensors=tensors, scalars={"layout": json.dumps(layout), "scalars": json.dumps(payload.scalars)})


# --- server side ------------------------------------------------------------------------------

Control = Callable[[str, dict[int, bytes]], dict[int, bytes | str]]


@dataclass
class SecureRound:
    """The server's side of one round (one attempt) of SecAgg+. `control(stage, messages)` delivers
    a control message to each client and returns its reply bytes, or why there is none.
    `directory` holds the clients' public keys for the whole run (shared by the run's rounds)."""

    config: Config
    rnd: int
    attempt: int
    control: Control
    dimension: int  # values in one update (`UpdateSpace.dimension`)
    directory: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    members: list[int] = field(default_factory=list)
    threshold: int = 0
    commitments: dict[int, bytes] = field(default_factory=dict)  # member -> its upload's commitments
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # src -> dst -> encrypted share
    corrupt: list[int] = field(default_factory=list)  # members whose shares rebuilt no committed secret
    unmasked: list[int] = field(default_factory=list)  # the members whose updates the mean holds
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
        """Keys for the clients the directory lacks, then the round's members; returns client ->
        why it cannot take part this round."""
        failures: dict[int, str] = {}
        new = [c for c in clients if c not in self.directory]
        known = {k for pair in self.directory.values() for k in pair}
        for cid, reply in self._call("setup", {c: pack({}) for c in new}, failures).items():
            try:
                blobs, _ = unpack(reply)
                keys = (blobs["pk1"], blobs["pk2"])
                if known & set(keys) or keys[0] == keys[1]:
                    raise PayloadError("a public key another client holds")
                bytes_to_public_key(keys[0]), bytes_to_public_key(keys[1])
            except Exception as exc:  # noqa: BLE001 -- a malformed reply costs its sender's round
                failures[cid] = f"secagg setup: malformed reply ({type(exc).__name__}: {exc})"[:300]
                continue
            self.directory[cid] = keys
            known |= set(keys)
        self.members = [c for c in clients if c in self.directory and c not in failures]
        self.threshold = max(2, math.ceil(self.config.privacy.secagg_threshold * len(self.members)))
        if len(self.members) < self.threshold:
            failures.update({c: f"secagg: {len(self.members)} members, fewer than the threshold {self.threshold}"
                             for c in self.members})
            self.members = []
        return failures

    def roster(self) -> str:
        """What each member's download carries: the round, the threshold and the members' keys."""
        members = {str(c): [_b64(self.directory[c][0]), _b64(self.directory[c][1])] for c in self.members}
        return json.dumps({"round": self.rnd, "attempt": self.attempt, "threshold": self.threshold,
                           "members": members})

    def check(self, cid: int, payload: Payload) -> None:
        """A masked upload's shape, shares and commitments (the method's own checks run on the mean)."""
        others = [c for c in self.members if c != cid]
        expected = {MASKED, "commit", *(f"ct/{c}" for c in others)}
        if cid not in self.members or set(payload.tensors) != expected:
            raise PayloadError("secagg: an upload must hold 'masked', 'commit' and one share per other member")
        masked = payload.tensors[MASKED]
        if masked.dtype != torch.int32 or masked.dim() != 1:
            raise PayloadError("secagg: 'masked' must be one int32 vector")
        layout, _ = _layout(payload)
        size = sum(math.prod(dims) for _, dims, _ in layout)
        if not size + 1 == masked.numel() == self.dimension + 1:
            raise PayloadError(f"secagg: the layout holds {size} values and the upload {masked.numel()} (one more: "
                               f"the clip count), where an update has {self.dimension}")
        commit = tensor_bytes(payload.tensors, "commit")
        if len(commit) != 32 * len(self.members):
            raise PayloadError("secagg: one commitment per member expected")
        self.ciphertexts[cid] = {c: tensor_bytes(payload.tensors, f"ct/{c}") for c in others}
        self.commitments[cid] = commit

    def upload_cap(self) -> int:
        """Bytes a masked upload may take, checked before decoding: 4 per value, 1 MiB of shares and metadata."""
        return 4 * (self.dimension + 1) + (1 << 20)

    def _commitment(self, owner: int, index: int) -> bytes:
        return self.commitments[owner][32 * index: 32 * index + 32]

    def unmask(self, uploads: dict[int, Payload]) -> tuple[Payload, dict[str, float]]:
        """The mean of `uploads` (the masked uploads that passed `check`), as the method's payload."""
        shape_of = Counter(_layout_key(p) for p in uploads.values()).most_common(1)[0][0]
        active = sorted(c for c, p in uploads.items() if _layout_key(p) == shape_of and c in self.commitments)
        if len(active) < self.threshold:
            raise PayloadError(f"secagg: {len(active)} uploads to unmask, fewer than the threshold {self.threshold}")
        dropped = sorted(set(self.members) - set(active))
        self.unmasked = active
        failures: dict[int, str] = {}
        requests = {v: pack({f"ct/{u}": self.ciphertexts[u][v] for u in active if u != v}, round=self.rnd,
                            attempt=self.attempt, active=active, dropped=dropped) for v in active}
        shares: dict[int, list[tuple[int, bytes]]] = {u: [] for u in active}  # owner -> [(holder, share)]
        keys: dict[tuple[int, int], bytes] = {}  # (active, dropped) -> their round key
        for v, reply in self._call("unmask", requests, failures).items():
            try:
                blobs, _ = unpack(reply)
                got = _by_client(blobs, "b")
                revealed = _by_client(blobs, "key")
            except PayloadError:
                continue  # a bad answer only costs its shares
            for u in active:
                if u in got:
                    shares[u].append((v, got[u]))
            for w in dropped:
                if w in revealed:
                    keys[(v, w)] = revealed[w]
        total = np.zeros(self.dimension + 1, dtype=np.int64)
        for c in active:
            total += uploads[c].tensors[MASKED].numpy().view(np.uint32)
        for u in active:
            seed = self._rebuild(shares[u], f"the round seed of member {u}",
                                 lambda b, owner=u: commitment(b) == self._commitment(owner, 0))
            add_mask(total, seed, -1)
        for w in dropped:
            for v in active:  # v added _sign(v, w) · PRG(k_vw): the key only v (and w) can give
                key = keys.get((v, w), b"")
                others = [c for c in self.members if c != v]
                if commitment(key) != self._commitment(v, 1 + others.index(w)):
                    raise PayloadError(f"secagg: member {v} gave no valid round key with dropped member {w}; "
                                       "its mask cannot be removed")
                add_mask(total, key, -_sign(v, w))
        summed = np.mod(total, SECAGG_MOD_RANGE, out=total)
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
            secret_value = _combine([share for _, share in subset])
            if secret_value is not None and valid(secret_value):
                break
        else:
            raise PayloadError(f"secagg: no {self.threshold} of the {len(shares)} shares of {what} rebuild its "
                               "committed value")
        chosen, trusted = {holder for holder, _ in subset}, [share for _, share in subset[:-1]]
        for holder, share in shares:
            if holder not in chosen and holder not in self.corrupt and _combine([*trusted, share]) != secret_value:
                self.corrupt.append(holder)
        return secret_value


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
