"""CG-FedLLM's learned codec (ALGORITHMS.md §4): a convolutional residual autoencoder over the
LoRA factors. The encoder runs on clients, the decoder on the server.

Layouts (how the named LoRA tensors become the AE's input; both are exact and invertible):

* ``GridLayout`` (``conv2d``, the paper's): every factor is oriented with its long side as rows
  and its rank side as columns (``A`` of shape r×in is transposed to in×r, ``B`` of shape out×r is
  kept), and the factors are laid **side by side** in the model's parameter order (layer by layer,
  q/k/v/o, A then B). For LLaMA-7B at rank 8 that is exactly the paper's 4096 × 2048 array. A
  factor shorter than the tallest one (``k``/``v`` ``B`` under grouped-query attention: 32 of 64
  rows in the tiny model, 192 of 576 in SmolLM2-135M) is zero-padded below; height and width are
  then zero-padded up to a multiple of 2^depth so that the stride-2 pyramid is exact. Padding
  cells are inputs of value 0 and are left out of the training loss. Tiny model (r = 8):
  64 × 128 grid, 8192 cells of which 7168 are values. SmolLM2-135M: 576 × 1920, 1 105 920 cells,
  921 600 values.
* ``ChunkLayout`` (``conv1d``): all factors flattened (row-major, in parameter order) and
  concatenated into one vector, cut into chunks of ``chunk`` values (the last one zero-padded);
  every chunk is one sample of the 1-D AE, so one upload is ``ceil(d / chunk)`` samples and the
  pooled training set is large even from a few snapshots.

Autoencoder (``ConvAutoencoder``): ``depth`` stride-2 convolutions (kernel 4, padding 1: exactly
halves each side), channels 1 → width → 2·width → … capped at 64 → ``latent_channels``, GELU
between them, ``res_blocks`` residual blocks (two 3×3 convs) at the deepest intermediate stage;
the decoder mirrors it with transposed convolutions and ends in tanh. The latent has
``latent_channels / 4^depth`` values per grid cell (2-D) or ``latent_channels / 2^depth`` per
chunk value (1-D): the paper's setting, six 1 → 64-channel stride-2 convs and 64 latent
channels, is 64 / 4096 = 1/64 of the **padded grid** (tiny: 128 latent values for 7168 LoRA
values = 1/56; SmolLM2-135M: 17 280 for 921 600 = 1/53.3). ``compression`` (cells per latent
value) picks ``latent_channels``; the 1-D default is 1/32 (depth 6, 2 latent channels).

Binary latent (``binary``): the encoder's output passes through sign(), so each latent value is
one bit on the wire (packed, 1 = negative) and the decoder reads ±1; training goes through the
sign with the straight-through estimator (the gradient of clamp(z, −1, 1)). A bit costs 1/32 of a
float32 latent value, so at the same bytes the bottleneck is 32 times wider: ``conv1d`` with
``depth = 1`` and ``compression = 2`` (one bit per two values) is 1/64 of FedIT's float32 upload.
Why it matters: a round's LoRA change is close to an isotropic Gaussian, and for such a source a
linear code of D real numbers keeps at most D/d of its energy in expectation (1/64 at 1/64: cos ≈ 0.13),
while the same bytes as bits can keep a third (one sign with a least-squares gain keeps 2/π of
the energy of what it covers).

Shuffling (``shuffle``): the (normalised) values are permuted by the permutation drawn from the
``seed`` given to ``prepare``/``encode``/``decode`` before the layout, and the reconstruction is
permuted back. Both sides draw it from the same (round, client) seed, so nothing more is sent. A
trained code is fixed, so without it the same entries share a latent value every round and error
feedback keeps piling the same entries' losses into the residual; with it every round pairs other
entries.

Scales: with ``normalize`` each tensor is divided by its max |value| before encoding (so it lies
in tanh's range [−1, 1]); with ``refit`` the client, which holds the decoder too, replaces each
tensor's scale by the least-squares gain ⟨x, x̂⟩/‖x̂‖² against the decoded output, so no tensor is
ever reconstructed worse than by sending zeros. Either way one float32 per tensor travels with
the latent.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from thinwire.compress.bits import pack_signs, unpack_signs
from thinwire.compress.codec import Codec
from thinwire.compress.fixed import FixedCodec

KINDS = ("conv2d", "conv1d")
LATENT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PAPER_COMPRESSION = {"conv2d": 64, "conv1d": 32}
MAX_SNR_DB = 300.0  # an exact reconstruction reports this instead of +inf


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    transpose: bool  # grid layout: stored as its transpose (long side as rows)
    offset: int      # first column (grid) or first flat index (chunks)
    rows: int
    cols: int


def _oriented(shape: tuple[int, ...]) -> tuple[bool, int, int]:
    if len(shape) == 1:
        return False, shape[0], 1
    if len(shape) != 2:
        raise ValueError(f"the autoencoder layouts take 1-D or 2-D tensors, not shape {shape}")
    transpose = shape[0] < shape[1]
    rows, cols = (shape[1], shape[0]) if transpose else shape
    return transpose, rows, cols


class GridLayout:
    """The paper's 2-D layout: factors side by side, long side as rows (see the module doc)."""

    dims = 2

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], multiple: int):
        slots, col = [], 0
        for name, shape in shapes:
            transpose, rows, cols = _oriented(tuple(shape))
            slots.append(Slot(name, tuple(shape), transpose, col, rows, cols))
            col += cols
        self.slots = slots
        self.height = _round_up(max(s.rows for s in slots), multiple)
        self.width = _round_up(col, multiple)
        self.values = sum(s.rows * s.cols for s in slots)
        self.mask = torch.zeros(1, 1, self.height, self.width, dtype=torch.bool)
        for s in slots:
            self.mask[0, 0, : s.rows, s.offset : s.offset + s.cols] = True

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (1, 1, self.height, self.width)

    @property
    def cells(self) -> int:
        return self.height * self.width

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        grid = torch.zeros(self.sample_shape, dtype=torch.float32)
        for s in self.slots:
            t = tensors[s.name].detach().float().cpu().reshape(s.shape)
            t = t.t() if s.transpose else t.reshape(s.rows, s.cols)
            grid[0, 0, : s.rows, s.offset : s.offset + s.cols] = t
        return grid

    def unpack(self, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for s in self.slots:
            piece = grid[0, 0, : s.rows, s.offset : s.offset + s.cols]
            out[s.name] = (piece.t() if s.transpose else piece).reshape(s.shape).contiguous()
        return out


class ChunkLayout:
    """1-D layout: every factor flattened and concatenated, cut into chunks of `chunk` values."""

    dims = 1

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], chunk: int):
        slots, offset = [], 0
        for name, shape in shapes:
            n = math.prod(shape)
            slots.append(Slot(name, tuple(shape), False, offset, n, 1))
            offset += n
        self.slots, self.chunk, self.values = slots, chunk, offset
        self.chunks = -(-offset // chunk)
        self.mask = (torch.arange(self.chunks * chunk) < offset).reshape(self.chunks, 1, chunk)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.chunks, 1, self.chunk)

    @property
    def cells(self) -> int:
        return self.chunks * self.chunk

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = torch.zeros(self.chunks * self.chunk, dtype=torch.float32)
        for s in self.slots:
            flat[s.offset : s.offset + s.rows] = tensors[s.name].detach().float().cpu().reshape(-1)
        return flat.reshape(self.sample_shape)

    def unpack(self, chunks: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = chunks.reshape(-1)
        return {s.name: flat[s.offset : s.offset + s.rows].reshape(s.shape).clone() for s in self.slots}


class ResBlock(nn.Module):
    def __init__(self, conv: type, channels: int):
        super().__init__()
        self.a = conv(channels, channels, 3, padding=1)
        self.b = conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(F.gelu(self.a(x)))


def binarize(z: torch.Tensor) -> torch.Tensor:
    """±1 by sign (0 counts as +1, as `pack_signs` writes it); in training, straight through the
    sign with the gradient of clamp(z, -1, 1)."""
    signs = torch.where(z < 0, -1.0, 1.0).to(z.dtype)
    if not z.requires_grad:
        return signs
    clamped = z.clamp(-1, 1)
    return clamped + (signs - clamped).detach()


class ConvAutoencoder(nn.Module):
    """Stride-2 conv encoder with residual blocks; mirrored transposed-conv decoder, tanh output.
    With `binary` the latent is binarized between the two."""

    def __init__(self, dims: int, depth: int, width: int, latent_channels: int, res_blocks: int,
                 binary: bool = False):
        super().__init__()
        self.binary = binary
        conv, convt = (nn.Conv2d, nn.ConvTranspose2d) if dims == 2 else (nn.Conv1d, nn.ConvTranspose1d)
        chans = [1] + [min(64, width * 2**i) for i in range(depth - 1)] + [latent_channels]
        self.channels = chans
        enc: list[nn.Module] = []
        for i in range(depth):
            enc.append(conv(chans[i], chans[i + 1], 4, stride=2, padding=1))
            if i < depth - 1:
                enc.append(nn.GELU())
                if i == depth - 2:
                    enc.extend(ResBlock(conv, chans[i + 1]) for _ in range(res_blocks))
        dec: list[nn.Module] = []
        for i in reversed(range(depth)):
            dec.append(convt(chans[i + 1], chans[i], 4, stride=2, padding=1))
            if i > 0:
                dec.append(nn.GELU())
                if i == depth - 1:
                    dec.extend(ResBlock(conv, chans[i]) for _ in range(res_blocks))
        dec.append(nn.Tanh())
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        # He initialisation: torch's default conv init shrinks the signal ~3x per layer, and through
        # 2·depth layers the decoder's output would barely depend on its input from the start.
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.b.weight)  # residual blocks start as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return self.decoder(binarize(z) if self.binary else z)


@dataclass(frozen=True)
class CodecSpec:
    """Everything that defines the AE architecture (saved with its weights)."""

    kind: str = "conv2d"
    depth: int = 6
    compression: int = 0  # 0: the paper's default for the kind
    width: int = 8
    res_blocks: int = 2
    chunk: int = 4096
    binary: bool = False  # one bit per latent value (sign), instead of a float

    def resolved_compression(self) -> int:
        return self.compression or PAPER_COMPRESSION[self.kind]

    def latent_channels(self) -> int:
        """Latent channels giving 1/compression of the padded input; ValueError if impossible."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown autoencoder kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.depth < 1:
            raise ValueError("depth must be at least 1")
        reduction = (4 if self.kind == "conv2d" else 2) ** self.depth  # input cells per latent position
        comp = self.resolved_compression()
        if reduction % comp or reduction < comp:
            raise ValueError(f"compression {comp} does not divide the {reduction} input cells per latent position "
                             f"of a depth-{self.depth} {self.kind} (choose a divisor, or change depth)")
        if self.kind == "conv1d" and self.chunk % 2**self.depth:
            raise ValueError(f"chunk {self.chunk} must be a multiple of 2^depth = {2**self.depth}")
        return reduction // comp


class AutoencoderCodec(Codec):
    """Layout + normalisation + autoencoder: `encode` on a client, `decode` on the server."""

    learned = True

    def __init__(self, spec: CodecSpec, shapes: list[tuple[str, tuple[int, ...]]], *, normalize: bool,
                 refit: bool, latent_dtype: str = "float32", shuffle: bool = False, seed: int = 0):
        self.spec, self.shuffle = spec, shuffle
        latent_channels = spec.latent_channels()
        if spec.kind == "conv2d":
            self.layout: GridLayout | ChunkLayout = GridLayout(shapes, 2**spec.depth)
        else:
            self.layout = ChunkLayout(shapes, spec.chunk)
        self.names = [s.name for s in self.layout.slots]
        self.flat = FixedCodec([(s.name, s.shape) for s in self.layout.slots])
        self.normalize, self.refit = normalize, refit
        self.latent_dtype = LATENT_DTYPES[latent_dtype]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = ConvAutoencoder(self.layout.dims, spec.depth, spec.width, latent_channels, spec.res_blocks,
                                         spec.binary)
        self.model.eval()
        shape = self.layout.sample_shape
        spatial = [n // 2**spec.depth for n in shape[2:]]
        self.latent_shape = (shape[0], latent_channels, *spatial)
        self.wire_names = ("latent", "scales") if self.sends_scales else ("latent",)

    # sizes ---------------------------------------------------------------------------------------
    @property
    def latent_values(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def wire_latent(self) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of the latent on the wire: packed sign bits, or the latent itself."""
        if self.spec.binary:
            return torch.uint8, (-(-self.latent_values // 8),)
        return self.latent_dtype, self.latent_shape

    @property
    def sends_scales(self) -> bool:
        return self.normalize or self.refit

    def ratio(self) -> dict[str, float]:
        """Latent values per input value (padded input, real values), and bytes sent (latent and
        scales) per float32 input byte."""
        dtype, shape = self.wire_latent
        sent = math.prod(shape) * dtype.itemsize + (4 * len(self.names) if self.sends_scales else 0)
        return {"latent_values": self.latent_values, "input_cells": self.layout.cells,
                "input_values": self.layout.values, "ratio_cells": self.latent_values / self.layout.cells,
                "ratio_values": self.latent_values / self.layout.values,
                "bytes_ratio": sent / (4 * self.layout.values)}

    # the pipeline --------------------------------------------------------------------------------
    def prepare(self, tensors: dict[str, torch.Tensor], seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The AE's input for `tensors` (normalised if configured, shuffled by `seed` if given) and
        the per-tensor max |value|."""
        return self._prepare(tensors, self._permutation(seed))

    def _prepare(self, tensors: dict[str, torch.Tensor], perm: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        norms = torch.tensor([float(tensors[n].detach().abs().max()) if tensors[n].numel() else 0.0
                              for n in self.names], dtype=torch.float32)
        if self.normalize:
            safe = torch.where(norms > 0, norms, torch.ones_like(norms))
            tensors = {n: tensors[n].detach().float().cpu() / safe[i] for i, n in enumerate(self.names)}
        return self.layout.pack(self._shuffled(tensors, perm)), norms

    def _permutation(self, seed: int | None) -> torch.Tensor | None:
        if not self.shuffle or seed is None:
            return None
        return torch.randperm(self.flat.total, generator=torch.Generator().manual_seed(seed))

    def _shuffled(self, tensors: dict[str, torch.Tensor], perm: torch.Tensor | None, inverse: bool = False
                  ) -> dict[str, torch.Tensor]:
        """All values permuted by `perm` (or back); the same tensors without one."""
        if perm is None:
            return tensors
        flat = self.flat.flatten(tensors)
        if inverse:
            out = torch.empty_like(flat)
            out[perm] = flat
        else:
            out = flat[perm]
        return self.flat.unflatten(out)

    @torch.no_grad()
    def encode(self, tensors: Mapping[str, torch.Tensor], seed: int | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({"latent": as it goes on the wire, "scales": if sent}, the reconstruction the server will compute)."""
        perm = self._permutation(seed)  # drawn once for both directions
        inputs, norms = self._prepare(dict(tensors), perm)
        z = self.model.encoder(inputs)
        wire = {"latent": pack_signs(z) if self.spec.binary else z.to(self.latent_dtype)}
        unit = self._unit(wire["latent"], perm)
        if self.refit:
            wire["scales"] = torch.tensor([_lsq_gain(tensors[n], unit[n]) for n in self.names], dtype=torch.float32)
        elif self.normalize:
            wire["scales"] = torch.where(norms > 0, norms, torch.ones_like(norms))
        return wire, self._scaled(unit, wire.get("scales"), next(iter(tensors.values())).device)

    @torch.no_grad()
    def decode(self, wire: Mapping[str, torch.Tensor], seed: int | None = None,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The reconstruction from a latent and its scales (the AE itself always runs on the CPU)."""
        return self._scaled(self._unit(wire["latent"], self._permutation(seed)), wire.get("scales"), device)

    def check(self, wire: Mapping[str, torch.Tensor]) -> str | None:
        dtype, shape = self.wire_latent
        latent = wire["latent"]
        if latent.dtype != dtype or tuple(latent.shape) != shape:
            return f"latent must be {dtype} of shape {shape}"
        if latent.is_floating_point() and not bool(torch.isfinite(latent.float()).all()):
            return "non-finite latent values"
        scales = wire.get("scales")
        if scales is not None:
            if scales.dtype != torch.float32 or tuple(scales.shape) != (len(self.names),):
                return f"scales must be float32 of shape ({len(self.names)},)"
            if not bool(torch.isfinite(scales).all()):
                return "non-finite scales"
        return None

    def _unit(self, latent: torch.Tensor, perm: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The decoder's output, unshuffled, before the scales."""
        return self._shuffled(self.layout.unpack(self.model.decoder(self._decoder_input(latent))), perm, inverse=True)

    def _decoder_input(self, latent: torch.Tensor) -> torch.Tensor:
        if self.spec.binary:
            return unpack_signs(latent, self.latent_values).reshape(self.latent_shape)
        return latent.float().cpu()

    def _scaled(self, unit: dict[str, torch.Tensor], scales: torch.Tensor | None,
                device: torch.device | str) -> dict[str, torch.Tensor]:
        if scales is not None:
            scales = scales.float().cpu()
            unit = {n: unit[n] * scales[i] for i, n in enumerate(self.names)}
        return {n: t.to(device) for n, t in unit.items()}

    # training ------------------------------------------------------------------------------------
    def fit(self, samples: torch.Tensor, steps: int, lr: float, batch: int, seed: int) -> dict[str, float]:
        """Adam on the masked MSE over `samples` ([N, 1, ...], prepared inputs); returns stats.

        The mask leaves padding cells out of the loss; for the 1-D layout, chunks that hold only
        padding are dropped first.
        """
        mask = self.layout.mask.expand(samples.shape[0] // self.layout.mask.shape[0], *self.layout.mask.shape)
        mask = mask.reshape(samples.shape)
        keep = mask.flatten(1).any(1)
        samples, mask = samples[keep], mask[keep].float()
        gen = torch.Generator().manual_seed(seed)
        before = self.evaluate(samples)
        started = time.perf_counter()
        optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(steps):
                idx = torch.randint(samples.shape[0], (min(batch, samples.shape[0]),), generator=gen)
                x, m = samples[idx], mask[idx]
                loss = (((self.model(x) - x) ** 2) * m).sum() / m.sum().clamp_min(1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.model.eval()
        after = self.evaluate(samples)
        return {"ae_samples": float(samples.shape[0]), "ae_steps": float(steps),
                "ae_rel_err_before": before, "ae_rel_err": after, "ae_train_s": time.perf_counter() - started}

    @torch.no_grad()
    def evaluate(self, samples: torch.Tensor, batch: int = 16) -> float:
        """Relative error ‖u − û‖/‖u‖ over `samples` in the AE's own (prepared) space."""
        err = total = 0.0
        for i in range(0, samples.shape[0], batch):
            x = samples[i : i + batch]
            err += float(((self.model(x) - x) ** 2).sum())
            total += float((x**2).sum())
        return math.sqrt(err / total) if total > 0 else 0.0

    # the artifact --------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load AE weights; ValueError naming the mismatch if they do not fit this architecture."""
        own = self.model.state_dict()
        if set(tensors) != set(own):
            missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise ValueError(f"autoencoder weights do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        for k, v in own.items():
            if tuple(tensors[k].shape) != tuple(v.shape):
                raise ValueError(f"autoencoder weight {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
        self.model.load_state_dict({k: t.float() for k, t in tensors.items()})
        self.model.eval()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.state_tensors(), str(tmp), metadata={"cgfedllm_codec": json.dumps(asdict(self.spec))})
        tmp.replace(path)


def load_artifact(path: str | Path) -> tuple[CodecSpec, dict[str, torch.Tensor]]:
    """An AE saved by `AutoencoderCodec.save`: its architecture and weights."""
    with safe_open(str(path), framework="pt") as handle:
        meta = (handle.metadata() or {}).get("cgfedllm_codec")
        if meta is None:
            raise ValueError(f"{path} is not a CG-FedLLM autoencoder (no 'cgfedllm_codec' metadata)")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open is not a dict
    return CodecSpec(**json.loads(meta)), tensors


def _lsq_gain(x: torch.Tensor, unit: torch.Tensor) -> float:
    x, u = x.detach().double().cpu().reshape(-1), unit.double().reshape(-1)
    denom = float(u @ u)
    return float(x @ u) / denom if denom > 0 else 0.0


def quality(x: dict[str, torch.Tensor], xhat: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error ‖x − x̂‖/‖x‖, cosine and SNR dB = 10·log10(‖x‖²/‖x − x̂‖²), over all tensors."""
    xx = err = xy = yy = 0.0
    for name, t in x.items():
        a, b = t.detach().double().cpu().reshape(-1), xhat[name].detach().double().cpu().reshape(-1)
        xx += float(a @ a)
        yy += float(b @ b)
        xy += float(a @ b)
        err += float(((a - b) ** 2).sum())
    rel = math.sqrt(err / xx) if xx > 0 else (0.0 if err == 0 else 1.0)
    cos = xy / math.sqrt(xx * yy) if xx > 0 and yy > 0 else 0.0
    if err == 0:
        snr = MAX_SNR_DB
    elif xx == 0:
        snr = -MAX_SNR_DB
    else:
        snr = max(-MAX_SNR_DB, min(MAX_SNR_DB, 10 * math.log10(xx / err)))
    return {"rel_err": rel, "cos": cos, "snr_db": snr}
