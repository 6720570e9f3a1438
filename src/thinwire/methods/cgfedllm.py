"""CG-FedLLM (ALGORITHMS.md §4): FedIT whose uploads pass through a learned autoencoder.

Phases, as rounds of one run (the `phase` entry of every round's aggregate metrics says which):

* ``tgap`` (rounds 1..``tgap_rounds``): TGAP is run as real federated rounds, because only the
  clients hold the data: plain FedIT on each client's TGAP share (``tgap_share`` of its examples,
  a seeded per-client split; paper: 30%). Each client uploads its object *uncompressed* at
  ``tgap_snapshots`` evenly spaced points of its local trajectory (the "temporal ensemble"); the
  last one is the round's update, aggregated as in FedIT. All of it is ordinary uplink and is
  counted. At the end of the last TGAP round the server trains the AE on the pooled snapshots
  (masked MSE, Adam; the paper's lr is 2e-4, which underfits in a few hundred steps: the
  default preset's one-bit AE trains at 1e-2, other learned codecs at 1e-3) and, with ``ae_save``, writes it as a safetensors artifact; ``ae_path`` loads such a
  file instead and skips TGAP (clients then use all their examples in every round).
* ``faf`` (the other rounds): clients train on the rest of their examples, encode the object and
  upload the latent (plus one float32 scale per tensor when ``normalize``/``refit_scales``); the
  server decodes and aggregates (``[method] aggregation``: the example-weighted mean by default,
  or a robust rule; ``paper_sum`` sums the decoded objects as the paper writes).
* ``calibrate`` (every ``refine_every``-th FAF round, off by default as in the paper): clients
  upload their object uncompressed (the server never sees ground truth otherwise: decoded
  objects cannot teach the AE anything), the server aggregates the exact objects, fine-tunes the
  AE on them plus the TGAP pool, and the new AE is re-sent (and counted) in later downloads.
* ``passthrough`` (``codec = "none"``): FedIT, bit for bit, same bytes on the wire.

Two codecs need no training and replace the autoencoder through the same TGAP/FAF rounds and error
feedback, each sized so the upload is ``compression`` times smaller than FedIT's float32 one:
``codec = "topk"``, global top-k sparsification (compress/topk.py, int32 positions +
``latent_dtype`` values), and ``codec = "signs"``, the scaled signs of a random subset drawn from
the (round, client) seed (compress/signs.py: one bit per sent entry, one float32 scale per tensor).
They show what the AE's 1/64 should reach. ``binary_latent`` makes the AE's own bottleneck one
sign bit per latent value (compress/autoencoder.py): the learned codec at the same bytes as
``signs``.

The AE is a public artifact distributed once: a client's first FAF download carries the whole AE
(encoder and decoder: the client needs the decoder for error feedback and to measure the
reconstruction it reports) and it is counted as downlink; later downloads carry it again only
after a calibration round changed it. The client keeps it in its ClientState (clients that share one
process share one copy: `shared_state_prefixes`).

Every codec, learned or not, sits behind compress/codec.py's interface (encode, decode, check,
ratio, with a (round, client) seed both sides draw from); this module holds only the rounds.

What is encoded (``target``): ``state`` the adapter after local training (Algorithm 1, the paper's
literal recipe), ``delta`` the round's change start − end, or ``grad`` the mean step
(start − end)/(lr·steps) (for SGD without clipping this is the mean gradient; with Adam it is the
mean normalised step). The server turns the aggregate back into an update: w − X for a state,
X for a delta, X·lr·steps for a grad, then applies it through the configured server optimizer.

Every FAF upload carries the client's reconstruction quality of what it encoded (it knows x and,
holding the decoder, x̂): rel_err ‖x − x̂‖/‖x‖, cos, snr_db 10·log10(‖x‖²/‖x − x̂‖²), the same
three for the update the server will apply (``update_*``: for a state that is start − x̂ against
start − x, which is what matters and is far worse than the state's own figures, since the state
is dominated by its initialisation; for a delta or grad they equal the plain ones), and
``ef_gain`` = ‖x + e‖/‖x‖ (how much the error-feedback residual adds); the server reports their
means per round, and ``swap_change``: how much a decoded update changes when the server decodes
another client's upload in its place (0: the decoder's output does not depend on its input).

Error feedback assumes the server applied what the client sent. Each download says which round
last had this client's upload aggregated (``accepted_round``); an upload that was rejected, lost
or in a skipped round goes back into the residual (``settle_residual``).

Presets (``preset``; every key the user sets wins over its preset, see ``PRESETS``):

* ``default``: the learned codec that works at 1/64 (measured below: 93-96% of FedIT's gain on the
  headline work): ``codec = "conv1d"``, ``depth = 1``, ``compression = 2``, ``res_blocks = 0``,
  ``binary_latent``, ``shuffle``, ``ae_lr = 1e-2``, ``ae_batch = 64``, on the repaired pipeline
  (``target = "delta"``, refitted per-tensor scales, error feedback).
* ``paper``: the paper's literal recipe, ``codec = "conv2d"`` (depth 6, float latent at 1/64),
  ``target = "state"``, ``normalize = false``, ``refit_scales = false``, ``error_feedback =
  false``, ``ae_lr = 2e-4``.

The architecture keys (depth, compression, res_blocks, binary_latent, shuffle, ae_lr, ae_batch)
belong to a preset's own codec: with another ``codec`` they take the generic defaults (depth 6,
the codec's paper compression, res_blocks 2, float latent, no shuffle, ae_lr 1e-3, ae_batch 8),
so ``codec = "conv2d"`` alone is the repaired float conv2d AE at 1/64 (the default before the
presets), and ``codec = "signs"`` / ``"topk"`` send their 1/64 budget.

Measured (benchmarks/cgfedllm.py): the literal recipe is worse than sending nothing (the update
it implies has rel. error > 1; on SmolLM2-135M it put the adapter back to the base model's loss).
The repaired pipeline never hurts (refitted scales keep every tensor's error ≤ that of zeros), but
at 1/64 the AE reconstructs fresh updates barely better than zeros (cos ≈ 0.02–0.06), so its FAF
rounds add nothing measurable over stopping after TGAP; at milder ratios (1/4) the same pipeline
matched FedIT's loss on the tiny model. A conv AE is translation-equivariant and cannot learn the
position-specific directions that updates share (PCA of TGAP deltas does, on the same data), and
what it learns on the TGAP share does not transfer to the FAF share's updates. On SmolLM2-135M's
8-client headline work (docs/benchmarks/history.md, fourth and fifth sessions), at 1/64 of FedIT's uplink
(shares of FedIT's exact-match / Rouge-L / loss gain): the learned 1-D AE with a one-bit latent and
shuffled input (``binary_latent``, ``shuffle``: variant ``cgfedllm-bits-shuffle``) 93% / 94% / 96%,
the same without shuffling 85% / 96% / 96% (its fixed code pairs the same entries every round and
its relative error climbs from 0.82 to 0.92), ``signs`` 96% / 99% / 97%, top-k 56% / 58% / 83%, the
float-latent AE 48% / 57% / 78%, the literal recipe 0%. A float latent of 1/64 of the values
does not work on updates this close to isotropic (a linear code of that size keeps ~1/64 of their
energy, and the trained AE does no better); the same bytes spent on sign bits keep about a third.

The server's checkpoint carries the AE, its version, who holds which version and (with
refinement) the snapshot pool; a frozen AE drops the pool once trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from thinwire.compress.autoencoder import (
    LATENT_DTYPES,
    AutoencoderCodec,
    CodecSpec,
    load_artifact,
    quality,
)
from thinwire.compress.codec import Codec
from thinwire.compress.fixed import ZerosCodec
from thinwire.compress.signs import SignCodec
from thinwire.compress.topk import TopKCodec
from thinwire.config import MAX_BATCH, MAX_RANK, MAX_ROUNDS, MAX_STEPS, Config, method_options, opt
from thinwire.errors import UsageError
from thinwire.methods import robust, validate
from thinwire.methods.aggregate import weighted_mean
from thinwire.methods.base import ClientState, Reply, Upload, load_into, snapshot
from thinwire.methods.fedavg import FedITClient, FedITServer
from thinwire.seeding import derive_seed
from thinwire.wire import Payload, PayloadError

AE_PREFIX = "ae/"   # AE weights inside a download and inside a ClientState
EF_PREFIX = "ef/"   # error-feedback residual inside a ClientState
SENT_PREFIX = "sent/"  # what the server will decode from the client's last upload, until it is confirmed
QUALITY = ("rel_err", "cos", "snr_db", "ef_gain", "update_rel_err", "update_cos", "update_snr_db")


AE_ARTIFACT = "autoencoder.safetensors"


# What `preset` sets. The keys a preset controls default to None (unset) in CGFedLLMOptions and are
# resolved in its __post_init__, so a key the user sets always wins over the preset. A preset has
# its codec, keys it sets whatever the codec ("always"), and keys that describe its own codec's
# autoencoder ("own_codec"): those apply only while the codec in use is the preset's, since they
# mean something else (or nothing) for another codec; keys left over take GENERIC.
PRESETS: dict[str, dict] = {
    # the learned codec that works at 1/64 (headline work: 93-96% of FedIT's gain): a 1-D conv AE
    # of depth 1 with a one-bit latent (one sign bit per two values: 1/64 of FedIT's float32
    # upload), input shuffled per upload, trained on the TGAP snapshots straight through the sign;
    # the repaired pipeline (round delta, refitted per-tensor scales, error feedback)
    "default": {"codec": "conv1d", "always": {},
                "own_codec": {"depth": 1, "compression": 2, "res_blocks": 0, "binary_latent": True,
                              "shuffle": True, "ae_lr": 1e-2, "ae_batch": 64}},
    # the paper's recipe as written (Algorithm 1): the 2-D residual conv AE (six stride-2 convs,
    # float latent at 1/64 of the padded grid) on the adapter state after local training, no
    # scales, no error feedback, AE trained with Adam at lr 2e-4. Measured: worse than sending
    # nothing (see the module docstring)
    "paper": {"codec": "conv2d",
              "always": {"target": "state", "normalize": False, "refit_scales": False, "error_feedback": False,
                         "ae_lr": 2e-4},
              "own_codec": {}},
}
GENERIC = {"target": "delta", "normalize": True, "refit_scales": True, "error_feedback": True, "depth": 6,
           "compression": 0, "res_blocks": 2, "binary_latent": False, "shuffle": False, "ae_lr": 1e-3,
           "ae_batch": 8}


@dataclass
class CGFedLLMOptions:
    """`[method.cgfedllm]`. Keys documented "(preset)" take their value from `preset` unless set."""

    preset: str = opt("default", "default: the learned codec that works at 1/64 (conv1d, depth 1, compression 2, "
                      "res_blocks 0, binary_latent, shuffle, ae_lr 1e-2, ae_batch 64; delta, scales, error "
                      "feedback); paper: the paper's recipe (conv2d AE of depth 6 with a float latent at 1/64, "
                      "target state, no normalize/refit_scales/error_feedback, ae_lr 2e-4). Keys you set win; "
                      "depth/compression/res_blocks/binary_latent/shuffle/ae_lr/ae_batch follow the preset only "
                      "while codec is the preset's own, else they take the generic defaults (depth 6, "
                      "compression 0, res_blocks 2, float latent, no shuffle, ae_lr 1e-3, ae_batch 8)",
                      choices=tuple(PRESETS))
    codec: str = opt(None, "(preset) conv2d: the paper's 2-D residual conv AE; conv1d: 1-D AE over chunks; "
                     "topk: global top-k sparsification (no AE); signs: scaled signs of a seeded random subset "
                     "(no AE); none: uncompressed pass-through "
                     "(FedIT bit for bit); zeros: send nothing (control)",
                     choices=("conv2d", "conv1d", "topk", "signs", "none", "zeros"))
    target: str = opt(None, "(preset) what is encoded: the adapter state (paper), the round's delta, or "
                      "delta/(lr·steps)", choices=("state", "delta", "grad"))
    normalize: bool = opt(None, "(preset) divide each tensor by its max |value| before encoding; scales sent "
                          "(fp32 each)")
    refit_scales: bool = opt(None, "(preset) client sends least-squares per-tensor gains against the decoded output")
    error_feedback: bool = opt(None, "(preset) client adds what the codec lost last time to its next input")
    paper_sum: bool = opt(False, "sum the decoded objects as the paper writes, instead of [method] aggregation "
                          "(the weighted mean by default)")
    compression: int = opt(None, "(preset) input cells per latent value (0: paper default, 64 for conv2d, 32 for "
                           "conv1d); topk, signs: FedIT's float32 upload bytes per sent byte (0: 64)", low=0,
                           high=1 << 20)
    depth: int = opt(None, "(preset) stride-2 conv layers of the encoder (and transposed convs of the decoder)",
                     low=1, high=12)
    width: int = opt(8, "channels of the first conv, doubling per layer up to 64", low=1, high=MAX_RANK)
    res_blocks: int = opt(None, "(preset) residual blocks at the deepest intermediate stage (each side)", low=0,
                          high=64)
    chunk: int = opt(4096, "conv1d: values per chunk (a multiple of 2^depth)", low=2, high=1 << 24)
    latent_dtype: str = opt("float32", "precision of the latent (topk: of the values) on the wire",
                            choices=tuple(LATENT_DTYPES))
    shuffle: bool = opt(None, "(preset) conv2d/conv1d: permute the entries by the (round, client) seed before "
                        "encoding (nothing more is sent), so a fixed code does not pair the same entries every round")
    binary_latent: bool = opt(None, "(preset) conv2d/conv1d: one sign bit per latent value (trained straight "
                              "through the sign), instead of latent_dtype; compression 2 with conv1d depth 1 is 1/64")
    tgap_rounds: int = opt(1, "first rounds that run TGAP (uncompressed FedIT on the TGAP share)", low=0,
                           high=MAX_ROUNDS)
    tgap_share: float = opt(0.3, "share of each client's examples used in TGAP; FAF uses the rest", low=0, high=1)
    tgap_snapshots: int = opt(4, "objects each client records (and uploads) per TGAP round, evenly spaced "
                              "over its local steps", low=1, high=1000)
    ae_steps: int = opt(300, "Adam steps training the AE after TGAP", low=0, high=MAX_STEPS)
    ae_lr: float = opt(None, "(preset) AE learning rate (paper: 2e-4, which underfits in a few hundred steps)",
                       low=0)
    ae_batch: int = opt(None, "(preset) AE training samples per step", low=1, high=MAX_BATCH)
    ae_path: str = opt("", "load this trained AE (a file written by ae_save) and skip TGAP")
    ae_save: str = opt("", "write the trained AE here (safetensors), after TGAP and after each refinement")
    refine_every: int = opt(0, "every N-th FAF round is a calibration round (exact uploads, AE fine-tuned "
                            "and re-sent); 0: AE frozen during FAF (paper)", low=0, high=MAX_ROUNDS)
    refine_steps: int = opt(100, "Adam steps of each AE refinement", low=0, high=MAX_STEPS)

    def __post_init__(self) -> None:
        """Give every key the user left unset (None) its value from the preset."""
        if self.preset not in PRESETS:
            raise UsageError(f"method.cgfedllm.preset = {self.preset!r} is not one of: {', '.join(PRESETS)}")
        preset = PRESETS[self.preset]
        if self.codec is None:
            self.codec = preset["codec"]
        values = {**GENERIC, **preset["always"]}
        if self.codec == preset["codec"]:
            values.update(preset["own_codec"])
        for key, value in values.items():
            if getattr(self, key) is None:
                setattr(self, key, value)


def _validate(o: CGFedLLMOptions, rounds: int) -> None:
    learned = o.codec in ("conv2d", "conv1d")
    if o.codec == "none":
        return
    if o.error_feedback and o.target == "state":
        raise UsageError("method.cgfedllm.error_feedback needs target = 'delta' or 'grad': a state is not "
                         "additive across rounds, so a residual cannot be carried into the next one")
    if o.codec in ("zeros", "topk", "signs") and o.target == "state":
        raise UsageError(f"method.cgfedllm.codec = '{o.codec}' with target = 'state' would zero (most of) the "
                         "adapter; use target = 'delta'")
    tgap = o.tgap_rounds > 0 and not o.ae_path
    if learned and not tgap and not o.ae_path:
        raise UsageError("method.cgfedllm.codec = '%s' needs a trained autoencoder: set tgap_rounds >= 1 "
                         "or ae_path to a saved one" % o.codec)
    if tgap and o.tgap_rounds >= rounds:
        raise UsageError(f"method.cgfedllm.tgap_rounds = {o.tgap_rounds} leaves no FAF round out of "
                         f"federation.rounds = {rounds}; lower it or add rounds")
    if tgap and not 0 < o.tgap_share < 1:
        raise UsageError(f"method.cgfedllm.tgap_share = {o.tgap_share} must lie strictly between 0 and 1 "
                         "while TGAP runs (its share and the FAF share both need examples)")
    if learned:
        try:
            _spec(o).latent_channels()
        except ValueError as exc:
            raise UsageError(f"method.cgfedllm: {exc}") from exc
    for flag in ("binary_latent", "shuffle"):
        if getattr(o, flag) and not learned:
            raise UsageError(f"method.cgfedllm.{flag} needs a learned codec (conv2d or conv1d)")
    if o.refine_every and not learned:
        raise UsageError("method.cgfedllm.refine_every needs a learned codec (conv2d or conv1d)")


def _spec(o: CGFedLLMOptions) -> CodecSpec:
    return CodecSpec(o.codec, o.depth, o.compression, o.width, o.res_blocks, o.chunk, o.binary_latent)


def _codec(o: CGFedLLMOptions, shapes: list[tuple[str, tuple[int, ...]]], seed: int) -> Codec:
    """The codec `o` names, over the trainable tensors `shapes` (an AE initialised from `seed`)."""
    if o.codec in ("conv2d", "conv1d"):
        return AutoencoderCodec(_spec(o), shapes, normalize=o.normalize, refit=o.refit_scales,
                                latent_dtype=o.latent_dtype, shuffle=o.shuffle, seed=seed)
    if o.codec == "topk":
        return TopKCodec(shapes, o.compression or 64, o.latent_dtype)
    if o.codec == "signs":
        return SignCodec(shapes, o.compression or 64)
    return ZerosCodec(shapes)


class _Rule:
    """What both sides share: options, phases, the codec and the data split."""

    codec: Codec

    def _setup_rule(self) -> None:
        self.options = o = method_options(self.config, "cgfedllm", CGFedLLMOptions)
        _validate(o, self.config.federation.rounds)
        self.tgap = o.codec != "none" and o.tgap_rounds > 0 and not o.ae_path
        if o.codec != "none":
            _, params = self.ctx.workbench.trainable(True)
            try:
                self.codec = _codec(o, [(n, tuple(p.shape)) for n, p in params.items()],
                                    derive_seed(self.config.federation.seed, "cgfedllm-ae-init"))
            except ValueError as exc:
                raise UsageError(f"method.cgfedllm: {exc}") from exc
        self.learned = o.codec != "none" and self.codec.learned

    @property
    def autoencoder(self) -> AutoencoderCodec:
        """The codec where it is a learned one (TGAP's pool, AE training, artifacts)."""
        if not isinstance(self.codec, AutoencoderCodec):
            raise TypeError(f"codec {self.options.codec!r} has no autoencoder")
        return self.codec

    def wire_seed(self, rnd: int, client_id: int, snapshot: int = 0) -> int:
        """The stream the codec draws from for this upload (a TGAP snapshot's, for the AE's training pool)."""
        return derive_seed(self.config.federation.seed, "cgfedllm-wire", rnd, client_id, snapshot)

    def phase(self, rnd: int) -> str:
        o = self.options
        if o.codec == "none":
            return "passthrough"
        if self.tgap and rnd <= o.tgap_rounds:
            return "tgap"
        faf_round = rnd - (o.tgap_rounds if self.tgap else 0)
        if o.refine_every and faf_round % o.refine_every == 0:
            return "calibrate"
        return "faf"

    def to_update(self, aggregate: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The aggregated object as an update Δ (the server subtracts it)."""
        target = self.options.target
        if target == "state":
            return {n: weights[n] - aggregate[n].to(weights[n].device) for n in weights}
        if target == "grad":
            steps = self.config.train.lr * self.config.train.local_steps
            return {n: t * steps for n, t in aggregate.items()}
        return aggregate


class CGFedLLMServer(_Rule, FedITServer):
    needs_shared_draws = True  # seeded codecs and input permutations are drawn on both sides
    private_refusal = "its server trains the autoencoder on clients' raw updates"

    @classmethod
    def update_space(cls, config: Config) -> None:
        return None

    def setup(self) -> None:
        self._setup_rule()
        if self.options.paper_sum and not robust.is_mean(self.config.method.aggregation):
            raise UsageError("method.cgfedllm.paper_sum replaces the mean; it cannot be combined with "
                             f"method.aggregation = {self.config.method.aggregation!r}")
        if self.options.paper_sum and self.config.method.aggregation == "bounded-mean":
            self.ctx.warn("method.cgfedllm.paper_sum sums the decoded objects unclipped: the bounded-mean norm "
                          "bound does not apply (set method.max_update_norm to bound each upload)")
        if self.options.paper_sum and self.config.method.server_optimizer == "fedexp":
            raise UsageError("method.cgfedllm.paper_sum sums the decoded objects, so FedExP has no client updates "
                             "to scale by: set method.server_optimizer to none, fedavgm or fedadam")
        super().setup()
        o = self.options
        self.ae_version = 0
        self.client_ae: dict[int, int] = {}
        self.accepted: dict[int, int] = {}  # client -> last round whose upload was aggregated
        self.pool: list[torch.Tensor] = []
        self._current: str | None = None            # the phase of the round being served
        self._round = 0                              # and its number (fixed codecs' seeds)
        self._objects: dict[int, tuple[Payload, dict[str, torch.Tensor]]] = {}  # decoded uploads of this round
        self._pending: dict[str, float] = {}        # metrics of an AE training run outside aggregate
        if o.ae_path:
            try:
                spec, tensors = load_artifact(o.ae_path)
            except (OSError, ValueError) as exc:
                raise UsageError(f"method.cgfedllm.ae_path: cannot read {o.ae_path}: {exc}") from exc
            if spec != self.autoencoder.spec:
                raise UsageError(f"method.cgfedllm.ae_path holds an AE of architecture {spec}, but the options "
                                 f"describe {self.autoencoder.spec}; set codec/depth/compression/width/res_blocks/chunk/"
                                 "binary_latent to match")
            try:
                self.autoencoder.load_tensors(tensors)
            except ValueError as exc:
                raise UsageError(f"method.cgfedllm.ae_path: {exc}") from exc
            self.ae_version = 1

    # -- the wire ------------------------------------------------------------------------------
    def download(self, rnd: int, client_id: int) -> Payload:
        phase = self._current = self.phase(rnd)
        self._round = rnd
        if phase == "passthrough":
            return super().download(rnd, client_id)
        if phase == "faf" and self.learned and self.ae_version == 0:
            # the last TGAP round was skipped (too few replies): train on what was pooled so far
            self._pending.update(self._train_ae(rnd, "tgap"))
        tensors = dict(self.weights)
        if phase == "faf" and self.learned and self.client_ae.get(client_id, 0) < self.ae_version:
            tensors.update({AE_PREFIX + k: v for k, v in self.autoencoder.state_tensors().items()})
        return Payload(tensors=tensors, scalars={"phase": phase, "ae_version": self.ae_version,
                                                 "accepted_round": self.accepted.get(client_id, 0)})

    def upload_bound(self) -> int:
        """TGAP uploads carry up to `tgap_snapshots` uncompressed adapters."""
        snapshots = self.options.tgap_snapshots if self.tgap else 1
        return 8 * snapshots * self.trainable_parameters() + (1 << 20)

    def check_update(self, reply: Reply) -> None:
        phase = self._current or self.phase(1)
        tensors, scalars = reply.payload.tensors, reply.payload.scalars
        if phase == "passthrough":
            validate.check_like(tensors, self.weights)
            return
        if str(scalars.get("phase")) != phase:
            raise PayloadError(f"a {phase} round got a {str(scalars.get('phase'))[:20]!r} upload")
        version = scalars.get("ae_version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= self.ae_version:
            raise PayloadError(f"ae_version must be an integer in [0, {self.ae_version}]")
        if phase in ("tgap", "calibrate"):
            snaps = _snapshots(tensors)
            expected = self.options.tgap_snapshots if phase == "tgap" else 1
            if not 1 <= len(snaps) <= expected:
                raise PayloadError(f"{len(snaps)} snapshots in a {phase} upload, expected 1 to {expected}")
            for snap in snaps:
                validate.check_like(snap, self.weights)
            return
        validate.int_scalar(scalars, "ae_version", self.ae_version)
        for key in QUALITY:
            value = scalars.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PayloadError(f"scalar {key!r} is missing or not a number")
        validate.check_names(tensors, self.codec.wire_names)
        problem = self.codec.check(tensors)
        if problem:
            raise PayloadError(f"{self.options.codec} upload: {problem}")

    def update_norm(self, reply: Reply) -> float:
        if self.options.codec == "none":
            return robust.l2_norm(reply.payload.tensors, self.weights)
        return robust.l2_norm(self._update_of(reply), self.weights)

    # -- aggregation ---------------------------------------------------------------------------
    def _object(self, reply: Reply) -> dict[str, torch.Tensor]:
        """The client's object: exact (last snapshot) or decoded; decoded once per round. The cache
        keeps each payload alive beside its object, so a later payload can never reuse a cached id."""
        cached = self._objects.get(id(reply.payload))
        if cached is not None and cached[0] is reply.payload:
            return cached[1]
        device = next(iter(self.weights.values())).device
        if (self._current or "faf") in ("tgap", "calibrate"):
            obj = _snapshots(reply.payload.tensors)[-1]
        else:
            obj = self.codec.decode(reply.payload.tensors, self.wire_seed(self._round, reply.client_id), device)
        self._objects[id(reply.payload)] = (reply.payload, obj)
        return obj

    def _update_of(self, reply: Reply) -> dict[str, torch.Tensor]:
        return self.to_update(self._object(reply), self.weights)

    def aggregate(self, rnd: int, replies: list[Reply]) -> dict[str, float]:
        phase = self._current = self.phase(rnd)
        self._round = rnd
        if phase == "passthrough":
            return {**super().aggregate(rnd, replies), "phase": "passthrough"}
        for reply in replies:
            self.check_update(reply)
        metrics: dict[str, float] = {"phase": phase, **self._pending}
        self._pending = {}
        if phase in ("tgap", "calibrate") and self.learned:
            self.pool.extend(self.autoencoder.prepare(snap, self.wire_seed(rnd, r.client_id, k))[0] for r in replies
                             for k, snap in enumerate(_snapshots(r.payload.tensors)))
        if phase == "faf":
            for key in QUALITY:
                metrics[key] = sum(float(r.payload.scalars[key]) for r in replies) / len(replies)
            metrics["rel_err_max"] = max(float(r.payload.scalars["rel_err"]) for r in replies)
            metrics["swap_change"] = self._swap_change(replies)
            metrics.update({k: float(v) for k, v in self.codec.ratio().items()})
        for reply in replies:
            self.client_ae[reply.client_id] = int(reply.payload.scalars.get("ae_version", 0))
            self.accepted[reply.client_id] = rnd
        cfg = self.config.method
        updates, weights = [], []
        if self.options.paper_sum:
            update = self.to_update(weighted_mean([self._object(r) for r in replies], [1.0] * len(replies)),
                                    self.weights)
        else:
            factors = [self.clip_factor(r) for r in replies]
            updates = [robust.scale(self._update_of(r), f) for r, f in zip(replies, factors)]
            weights = self.aggregation_weights(replies)
            update = robust.combine_tensors(updates, weights, cfg.aggregation, cfg.trim_fraction)
            if self.clipping():
                metrics["clipped"] = float(sum(f < 1.0 for f in factors))
        metrics.update(self.optimizer.step(self.weights, update, updates, weights))
        self._objects.clear()
        metrics["update_norm"] = robust.l2_norm(update, self.weights)
        if self.learned and ((phase == "tgap" and rnd == self.options.tgap_rounds) or phase == "calibrate"):
            metrics.update(self._train_ae(rnd, phase))
        metrics["ae_version"] = self.ae_version
        return metrics

    def _swap_change(self, replies: list[Reply]) -> float:
        """Mean ‖u_i − u_j‖/‖u_i‖ of the decoded updates, j the next reply (cyclically): how much
        the server's result changes when it decodes another client's upload instead. 0 means the
        decoder ignores its input (the failure ALGORITHMS.md §4 describes); independent updates of
        equal norm give about √2."""
        updates = [self._update_of(r) for r in replies]
        changes = []
        for i, mine in enumerate(updates):
            other, norm = updates[(i + 1) % len(updates)], _norm(mine)
            if len(updates) > 1 and norm > 0:
                changes.append(_norm({n: mine[n] - other[n] for n in mine}) / norm)
        return sum(changes) / len(changes) if changes else 0.0

    def _train_ae(self, rnd: int, phase: str) -> dict[str, float]:
        o = self.options
        if not self.pool:
            raise RuntimeError("no TGAP snapshot reached the server: the autoencoder cannot be trained")
        steps = o.ae_steps if phase == "tgap" else o.refine_steps
        stats = self.autoencoder.fit(torch.cat(self.pool), steps, o.ae_lr, o.ae_batch,
                               derive_seed(self.config.federation.seed, "cgfedllm-ae-train", rnd))
        self.ae_version += 1
        if not o.refine_every:
            self.pool = []  # a frozen AE never trains again: free the snapshots (and keep checkpoints small)
        if o.ae_save:
            self.autoencoder.save(o.ae_save)
        return stats

    def save_artifacts(self, directory: Path) -> list[str]:
        """`autoencoder.safetensors`: the trained AE, reusable through `ae_path` (skips TGAP)."""
        if not self.learned:
            return []
        self.autoencoder.save(directory / AE_ARTIFACT)
        return [AE_ARTIFACT]

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Payload | None:
        base = super().state_dict()
        if base is None:
            return None
        tensors = dict(base.tensors)
        if self.learned:
            tensors.update({AE_PREFIX + k: v for k, v in self.autoencoder.state_tensors().items()})
            tensors.update({f"pool/{i}": t for i, t in enumerate(self.pool)})
        return Payload(tensors=tensors, scalars={"ae_version": self.ae_version,
                                                 "client_ae": json.dumps(sorted(self.client_ae.items())),
                                                 "accepted": json.dumps(sorted(self.accepted.items()))})

    def load_state_dict(self, state: Payload) -> None:
        super().load_state_dict(state)
        self.ae_version = int(state.scalars.get("ae_version", 0))
        self.client_ae = {int(c): int(v) for c, v in json.loads(str(state.scalars.get("client_ae", "[]")))}
        self.accepted = {int(c): int(v) for c, v in json.loads(str(state.scalars.get("accepted", "[]")))}
        if self.learned:
            self.autoencoder.load_tensors({k[len(AE_PREFIX):]: t for k, t in state.tensors.items()
                                           if k.startswith(AE_PREFIX)})
            pool = {int(k[5:]): t for k, t in state.tensors.items() if k.startswith("pool/")}
            self.pool = [pool[i] for i in sorted(pool)]


def _snapshots(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """An uncompressed upload's snapshots 's<k>/<name>', in order (the last is the round's object)."""
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        head, _, name = key.partition("/")
        if not (head.startswith("s") and head[1:].isdigit() and name):
            raise PayloadError(f"unexpected tensor {key[:60]!r} in an uncompressed upload")
        snaps.setdefault(int(head[1:]), {})[name] = t
    if not snaps or sorted(snaps) != list(range(len(snaps))):
        raise PayloadError("an uncompressed upload with no snapshots or a gap in their numbering")
    return [snaps[i] for i in range(len(snaps))]


class CGFedLLMClient(_Rule, FedITClient):
    shared_state_prefixes = (AE_PREFIX,)  # the downloaded AE: one copy for all clients in one process

    def __init__(self, ctx):
        super().__init__(ctx)
        self._setup_rule()
        self._codec_version: int | None = None

    def split(self, examples: list[dict], client_id: int, phase: str) -> list[dict]:
        """The client's TGAP share (a seeded subset) in TGAP rounds, the rest otherwise."""
        if not self.tgap or len(examples) < 2:
            return examples
        n = len(examples)
        k = min(n - 1, max(1, round(self.options.tgap_share * n)))
        order = np.random.default_rng(derive_seed(self.config.federation.seed, "cgfedllm-split", client_id)).permutation(n)
        chosen = sorted(order[:k].tolist()) if phase == "tgap" else sorted(order[k:].tolist())
        return [examples[i] for i in chosen]

    def fit(self, rnd: int, client_id: int, download: Payload, examples: list[dict],
            state: ClientState) -> Upload:
        phase = self.phase(rnd)
        if phase == "passthrough":
            return super().fit(rnd, client_id, download, examples, state)
        if str(download.scalars.get("phase")) != phase:
            raise PayloadError(f"download is for phase {download.scalars.get('phase')!r}, this is a {phase} round")
        self._keep_ae(download, state)
        self.settle_residual(state, int(download.scalars.get("accepted_round", 0)))
        model, params = self.ctx.workbench.trainable(True)
        load_into(params, {k: v for k, v in download.tensors.items() if not k.startswith(AE_PREFIX)})
        start = snapshot(params)
        data = self.split(examples, client_id, phase)
        steps = self.config.train.local_steps
        count = self.options.tgap_snapshots if phase == "tgap" else 1
        marks = sorted({max(1, round(steps * (k + 1) / count)) for k in range(count)})
        snaps: list[tuple[int, dict[str, torch.Tensor]]] = []
        outer, done = self.ctx.on_step, [0]

        def on_step() -> None:
            done[0] += 1
            if done[0] in marks[:-1]:
                snaps.append((done[0], snapshot(params)))
            if outer is not None:
                outer()

        self.ctx.on_step = on_step
        try:
            stats = self.local_train(model, params, data, rnd, client_id)
        finally:
            self.ctx.on_step = outer
        snaps.append((steps, snapshot(params)))
        objects = [self._object(start, end, k) for k, end in snaps]
        metrics = {"train_loss": stats.loss, "tokens": stats.tokens, "train_s": stats.seconds,
                   "examples_used": len(data)}
        scalars = {"phase": phase, "ae_version": int(state.scalars.get("ae_version", 0))}
        if phase == "tgap":
            tensors = {f"s{i}/{n}": t for i, obj in enumerate(objects) for n, t in obj.items()}
            return Upload(Payload(tensors=tensors, scalars=scalars), len(data), metrics)
        x = objects[-1]
        residual = {n[len(EF_PREFIX):]: t for n, t in state.tensors.items() if n.startswith(EF_PREFIX)}
        x_in = {n: t + residual[n].to(t.device) if n in residual else t for n, t in x.items()}
        if phase == "calibrate":
            self._record_upload(state, rnd, x_in, None)
            return Upload(Payload(tensors={f"s0/{n}": t for n, t in x_in.items()}, scalars=scalars), len(data), metrics)
        codec = self._client_codec(state) if self.learned else self.codec
        tensors, xhat = codec.encode(x_in, self.wire_seed(rnd, client_id))
        # zeros keeps no residual: nothing is ever sent, so it would only grow
        if self.options.error_feedback and self.options.codec != "zeros":
            self._record_upload(state, rnd, xhat, {n: x_in[n] - xhat[n] for n in x_in})
        q = quality(x_in, xhat)
        q["ef_gain"] = _norm(x_in) / max(_norm(x), 1e-30)
        if self.options.target == "state":  # what the server will apply: start − x̂ instead of start − x
            u = quality({n: start[n] - x_in[n] for n in x_in}, {n: start[n] - xhat[n] for n in x_in})
        else:  # a delta or a grad is the update itself, up to a constant factor
            u = {k: q[k] for k in ("rel_err", "cos", "snr_db")}
        q.update({f"update_{k}": v for k, v in u.items()})
        scalars.update(q)
        metrics.update({f"codec_{k}": v for k, v in q.items()})
        return Upload(Payload(tensors=tensors, scalars=scalars), len(data), metrics)

    def _object(self, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], steps_done: int):
        target = self.options.target
        if target == "state":
            return {n: t.clone() for n, t in end.items()}
        delta = {n: start[n] - end[n] for n in start}
        if target == "grad":
            scale = 1.0 / (self.config.train.lr * steps_done) if self.config.train.lr > 0 else 0.0
            return {n: t * scale for n, t in delta.items()}
        return delta

    @staticmethod
    def _keep_ae(download: Payload, state: ClientState) -> None:
        ae = {k: v for k, v in download.tensors.items() if k.startswith(AE_PREFIX)}
        if ae:
            state.tensors = {k: v for k, v in state.tensors.items() if not k.startswith(AE_PREFIX)}
            state.tensors.update({k: v.clone() for k, v in ae.items()})
            state.scalars["ae_version"] = int(download.scalars["ae_version"])

    def _client_codec(self, state: ClientState) -> Codec:
        version = int(state.scalars.get("ae_version", 0))
        if version < 1:
            raise PayloadError("this client holds no autoencoder: its FAF download should have carried one")
        if self._codec_version != version:
            try:
                self.autoencoder.load_tensors({k[len(AE_PREFIX):]: v for k, v in state.tensors.items()
                                               if k.startswith(AE_PREFIX)})
            except ValueError as exc:
                raise PayloadError(f"the downloaded autoencoder does not fit: {exc}") from exc
            self._codec_version = version
        return self.codec

    @classmethod
    def _set_residual(cls, state: ClientState, residual: dict[str, torch.Tensor] | None) -> None:
        cls._set_prefixed(state, EF_PREFIX, residual)

    def _record_upload(self, state: ClientState, rnd: int, sent: dict[str, torch.Tensor],
                       residual: dict[str, torch.Tensor] | None) -> None:
        """The new residual, and (with error feedback) what the server should apply, until confirmed."""
        self._set_residual(state, residual)
        if self.options.error_feedback:
            self._set_prefixed(state, SENT_PREFIX, sent)
            state.scalars["sent_round"] = rnd

    @staticmethod
    def _set_prefixed(state: ClientState, prefix: str, tensors: dict[str, torch.Tensor] | None) -> None:
        state.tensors = {k: v for k, v in state.tensors.items() if not k.startswith(prefix)}
        if tensors:
            state.tensors.update({prefix + n: t.detach().float().contiguous() for n, t in tensors.items()})

    @classmethod
    def settle_residual(cls, state: ClientState, accepted_round: int) -> None:
        """Error feedback assumes the server applied what the client sent. The client learns
        whether it did from the next download (the last round the server aggregated one of its
        uploads); a rejected, lost or skipped upload's decoded content goes back into the residual
        so it is sent again rather than dropped."""
        sent = {k[len(SENT_PREFIX):]: v for k, v in state.tensors.items() if k.startswith(SENT_PREFIX)}
        sent_round = int(state.scalars.pop("sent_round", 0))
        if not sent:
            return
        if sent_round != accepted_round:
            residual = {k[len(EF_PREFIX):]: v for k, v in state.tensors.items() if k.startswith(EF_PREFIX)}
            cls._set_residual(state, {n: residual[n] + t if n in residual else t for n, t in sent.items()})
        cls._set_prefixed(state, SENT_PREFIX, None)


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))
