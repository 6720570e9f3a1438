"""Typed experiment config: TOML sections, `--set section.key=value` overrides, strict validation.

Every key has a default and a one-line doc (`thinwire config` could print them); an unknown
key, a wrong type or an out-of-range value raises `UsageError` naming the key.
Method-specific options live in a sub-table `[method.<name>]`, validated by the method's own
options dataclass, so a method adds knobs without touching this file.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinwire.errors import UsageError
from thinwire.methods import METHOD_NAMES, option_classes, train_defaults

EXAMPLES = Path(__file__).resolve().parent / "examples"  # shipped inside the package


# Upper bounds of the size options: far above what a run here or on one GPU node holds, low enough
# that a typo (10**9) is a one-line error instead of a run that never ends, a hang or a MemoryError.
MAX_ROUNDS = 100_000  # rounds (and round-counted options): days of rounds at a second each
MAX_CLIENTS = 100_000  # simulated data owners: one state each, held for the whole run
MAX_STEPS = 1_000_000  # optimizer steps of one local, healing or autoencoder loop
MAX_BATCH = 4096  # examples per batch: activations grow with it
MAX_TOKENS = 32_768  # tokens of one example or one generation: longer than any built-in model's context
MAX_EXAMPLES = 1_000_000  # examples of one kind (per client, distilled)
MAX_EVAL_EXAMPLES = 100_000  # held-out examples: the built-in suite draws 4x as many to find unseen ones
MAX_SUITE_EXAMPLES = 2_000_000  # built-in examples generated for one run: ~300 bytes and ~15 us each
MAX_RANK = 4096  # ranks and widths: beyond any built-in model's hidden size


def default_config() -> Path:
    """`examples/quickstart.toml`: what `thinwire run` runs without a config."""
    return EXAMPLES / "quickstart.toml"


def opt(default: Any, doc: str, *, choices: tuple | None = None, low: float | None = None,
        high: float | None = None) -> Any:
    """A config field with its documentation and the values it accepts."""
    meta = {"doc": doc, "choices": choices, "low": low, "high": high}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = opt("tiny", "built-in name (see `thinwire models`), hub id, local directory or .gguf file")
    dtype: str = opt("auto", "weight dtype", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = opt("auto", "torch device: auto, cpu, cuda, cuda:N or mps")
    lora_rank: int = opt(8, "LoRA rank for methods that train an adapter", low=1, high=MAX_RANK)
    lora_alpha: float = opt(16.0, "LoRA scaling numerator (scale = alpha / rank)", low=0)
    lora_dropout: float = opt(0.0, "LoRA dropout", low=0, high=0.99)
    lora_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "module names LoRA wraps")
    # how `smollm2-small` (FedPT's device model) is cut down from SmolLM2-135M and healed
    # (models/small.py); a cached build with another recipe is rebuilt
    small_layers: int = opt(30, "smollm2-small: decoder layers kept", low=1, high=MAX_RANK)
    small_keep_last: int = opt(0, "smollm2-small: how many of the kept layers are the large model's last",
                               low=0, high=MAX_RANK)
    small_mlp_width: int = opt(256, "smollm2-small: MLP neurons kept per layer (0: whole MLPs)", low=0, high=MAX_RANK)
    small_head_rank: int = opt(96, "smollm2-small: rank of the factorised LM head (0: the full tied head)",
                               low=0, high=MAX_RANK)
    small_heal_steps: int = opt(180, "smollm2-small: distillation steps that heal it", low=0, high=MAX_STEPS)
    small_heal_per_family: int = opt(8, "smollm2-small: healing examples per task family", low=1, high=MAX_EXAMPLES)
    small_heal_focus: str = opt("all", "smollm2-small: KL on every position, or on the response's (and a "
                                "quarter of the prompt's)", choices=("all", "response"))
    small_heal_data: str = opt("disjoint", "smollm2-small: heal on the families outside the headline's "
                               "evaluation, or on all 42", choices=("disjoint", "all"))


@dataclass
class DataConfig:
    source: str = opt("tasks", "'tasks' for the built-in suite, a data file or directory, or a dataset hub id")
    format: str = opt("auto", "format of data.source",
                      choices=("auto", "alpaca", "dolly", "natural-instructions", "hf"))
    instruction_field: str = opt("", "record field holding the instruction ('' = the format's default)")
    input_field: str = opt("", "record field holding the input ('' = the format's default)")
    output_field: str = opt("", "record field holding the reference output ('' = the format's default)")
    tasks: list[str] = opt([], "task families of the built-in suite to use (empty: all)")
    heldout_tasks: list[str] = opt([], "tasks kept out of training, evaluated apart (generalisation)")
    examples_per_client: int = opt(64, "training examples generated per client (built-in suite)", low=1,
                                   high=MAX_EXAMPLES)
    eval_examples: int = opt(32, "held-out evaluation examples", low=1, high=MAX_EVAL_EXAMPLES)
    eval_split: str = opt("test", "what the run evaluates on: the reported test split, or a validation "
                          "split disjoint from it and from training (for tuning: benchmarks/tune.py)",
                          choices=("test", "validation"))
    partition: str = opt("iid", "how examples are split over clients",
                         choices=("iid", "dirichlet", "by-task"))
    dirichlet_alpha: float = opt(0.5, "Dirichlet concentration over categories", low=1e-6)
    category_field: str = opt("category", "example field that dirichlet partitions over")
    quantity_skew: float = opt(0.0, "lognormal sigma of per-client dataset sizes (0: equal)", low=0)
    max_length: int = opt(256, "tokens per training example (longer ones are truncated)", low=8, high=MAX_TOKENS)
    template: str = opt("alpaca", "prompt template: Alpaca (measured to serve SmolLM2-Instruct as well as its "
                        "own, docs/benchmarks/measurements.md), the tokenizer's chat template, or auto (chat when the "
                        "tokenizer has one); the loss covers the response in each",
                        choices=("alpaca", "chat", "auto"))


@dataclass
class FederationConfig:
    clients: int = opt(4, "number of clients (data owners)", low=1, high=MAX_CLIENTS)
    clients_per_round: int = opt(2, "clients sampled each round", low=1, high=MAX_CLIENTS)
    rounds: int = opt(2, "federated rounds", low=1, high=MAX_ROUNDS)
    seed: int = opt(0, "run seed: every random choice derives from it", low=0, high=2**63 - 1)
    failure_rate: float = opt(0.0, "simulated faults: share of sampled clients that fail each round "
                              "(local runtime; seeded per round)", low=0, high=1)
    straggler_rate: float = opt(0.0, "simulated stragglers: share of sampled clients that miss the round "
                                "deadline (local runtime)", low=0, high=1)
    round_timeout_s: float = opt(600.0, "round deadline: a client that has not replied by then costs its "
                                 "update for the round", low=1e-3, high=30 * 86400.0)
    min_replies: int = opt(1, "fewest accepted replies a round needs to aggregate", low=1, high=MAX_CLIENTS)
    max_examples: int = opt(0, "most training examples a client may claim for its weight (0: the largest "
                            "partition the server knows of)", low=0, high=10**12)
    on_too_few: str = opt("skip", "a round with fewer than min_replies replies: skip it, or retry it "
                          "with a fresh sample of clients", choices=("skip", "retry"))
    max_retries: int = opt(2, "most retries of one round with on_too_few = 'retry'", low=0, high=100)
    checkpoint: bool = opt(True, "write a resumable checkpoint after every round (thinwire run --resume)")


@dataclass
class MethodConfig:
    name: str = opt("fedit", "federated method", choices=METHOD_NAMES)
    weighting: str = opt("examples", "how client updates are weighted", choices=("examples", "equal"))
    server_optimizer: str = opt("none", "server optimizer over the mean update (fedexp: a step of "
                                "server_lr x max(1, mean client |update|^2 / (2 |mean update|^2)))",
                                choices=("none", "fedavgm", "fedadam", "fedexp"))
    server_lr: float = opt(1.0, "the server optimizer's step on the aggregated update (fedavg, fedit, "
                           "cgfedllm, fedpt; ferret: method.ferret.server_lr, fedkseed: "
                           "method.fedkseed.global_lr_scale)", low=0)
    server_momentum: float = opt(0.9, "FedAvgM momentum / FedAdam beta1", low=0, high=0.999999)
    server_beta2: float = opt(0.99, "FedAdam beta2", low=0, high=0.999999)
    server_tau: float = opt(1e-3, "FedAdam adaptivity / FedExP epsilon", low=0)
    aggregation: str = opt("bounded-mean", "how client updates are combined: weighted mean with each update "
                           "clipped to norm_bound_factor x the round's median update norm (the default; 'mean' "
                           "under privacy.dp or privacy.secagg), plain weighted mean, or coordinate-wise median / "
                           "trimmed mean (unweighted; robust to a few hostile clients)",
                           choices=("bounded-mean", "mean", "median", "trimmed-mean"))
    norm_bound_factor: float = opt(3.0, "bounded-mean: clip each update to this multiple of the round's "
                                   "(lower) median update norm", low=1)
    trim_fraction: float = opt(0.2, "trimmed-mean: share of clients cut from each end per coordinate "
                               "(ceil(fraction * n), at most (n - 1) // 2)", low=0, high=0.49)
    clip_update_norm: float = opt(0.0, "scale each client's update down to this L2 norm before "
                                  "aggregating (0: off)", low=0)
    max_update_norm: float = opt(0.0, "reject a client update whose L2 norm exceeds this (0: off)", low=0)
    max_update_value: float = opt(1e6, "reject a client update holding a value whose magnitude exceeds this "
                                  "(a plausibility bound far above any honest update; 0: off)", low=0)
    max_upload_bytes: int = opt(0, "reject uploads larger than this many bytes (0: the method's own bound)",
                                low=0, high=1 << 34)
    options: dict[str, Any] = field(default_factory=dict, metadata={"doc": "[method.<name>] tables"})


@dataclass
class TrainConfig:
    local_steps: int = opt(10, "optimizer steps per client per round", low=1, high=MAX_STEPS)
    batch_size: int = opt(4, "examples per micro-batch", low=1, high=MAX_BATCH)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", low=1, high=MAX_BATCH)
    lr: float = opt(1e-4, "local learning rate", low=0)
    optimizer: str = opt("adamw", "local optimizer", choices=("adamw", "sgd"))
    momentum: float = opt(0.0, "SGD momentum (Ferret's released code: 0); a client's momentum starts at "
                          "zero every round", low=0, high=0.999)
    weight_decay: float = opt(0.0, "AdamW/SGD weight decay", low=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", low=0)


@dataclass
class EvalConfig:
    every: int = opt(1, "evaluate every N rounds (0: only before the first and after the last)", low=0, high=MAX_ROUNDS)
    max_examples: int = opt(32, "held-out examples evaluated", low=1, high=MAX_EVAL_EXAMPLES)
    generate: bool = opt(True, "greedy generation for Rouge-L and exact match (else loss only)")
    max_new_tokens: int = opt(32, "generation length bound", low=1, high=MAX_TOKENS)
    batch_size: int = opt(16, "evaluation batch size", low=1, high=MAX_BATCH)


@dataclass
class PrivacyConfig:
    dp: str = opt("none", "client-level differential privacy: none; central (the server clips every update "
                  "and noises their sum); local (each client clips and noises its own)",
                  choices=("none", "central", "local"))
    clip_norm: float = opt(1.0, "L2 bound of one client's update, in the method's update space", low=1e-12)
    noise_multiplier: float = opt(0.0, "Gaussian noise std / clip_norm (on the sum for central DP, on each "
                                  "update for local DP)", low=0)
    delta: float = opt(1e-5, "the delta of the reported (epsilon, delta)", low=1e-300, high=1.0)
    secagg: bool = opt(False, "secure aggregation (Flower's SecAgg+): the server learns only the sum of the "
                       "round's updates")
    secagg_clip_range: float = opt(8.0, "SecAgg+: every update value is clipped to [-range, range] before "
                                   "quantisation", low=1e-12)
    secagg_quantization: int = opt(1 << 22, "SecAgg+: integer levels over [-range, range] (the step is "
                                   "2 range / levels)", low=2, high=1 << 31)
    secagg_threshold: float = opt(0.66, "SecAgg+: fraction of the round's clients whose shares rebuild a "
                                  "secret (at least 2 clients)", low=0.0, high=1.0)
    secagg_allow_low_threshold: bool = opt(False, "SecAgg+: accept secagg_threshold <= 0.5, where a server that "
                                           "sends clients inconsistent lists can unmask one")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def load_config(path: str | Path | None, overrides: list[str] = (), variant: str | None = None) -> Config:
    """Read a TOML file (or start from defaults), apply `section.key=value` overrides, validate.

    A file may hold per-run settings in `[compare.<name>.<section>]` tables: per-method settings
    when <name> is a method (e.g. a higher lr for LoRA methods), or a named variant when the
    table sets `method.name` (e.g. [compare.fedpt-a0.5] running fedpt with another alpha).
    `variant` names the table merged in, before the overrides; without it, the table of the
    method that runs (after the overrides) is merged, so `thinwire run FILE --set method.name=X`
    runs X exactly as `thinwire compare FILE --methods X` does.

    Keys that neither the file nor the overrides set take their defaults; for `[train]`, the
    running method's own defaults (`ServerSide.train_defaults`, e.g. Ferret's SGD) come first.
    """
    return from_dict(_resolved_table(path, overrides, variant))


def default_model_notice(path: str | Path | None, overrides: list[str] = (), variant: str | None = None) -> str | None:
    """A one-line notice when neither the file nor the overrides name a model (the run then trains
    the built-in random-weight `tiny` model, which is easy to miss)."""
    model = _resolved_table(path, overrides, variant).get("model")
    if isinstance(model, dict) and "name" in model:
        return None
    return (f"notice: no model.name in the config; training the built-in random-weight {ModelConfig.name!r} "
            "model (set [model] name, e.g. smollm2-135m; see `thinwire models`)")


def _resolved_table(path: str | Path | None, overrides: list[str], variant: str | None) -> dict[str, Any]:
    """The file's table with the running method's (or `variant`'s) [compare] table and the overrides merged in."""
    table = _read_table(path)
    per_run = _compare_tables(table.pop("compare", {}))
    chosen = variant if variant is not None else _method_name(table, overrides)
    if chosen in per_run:
        _merge_tables(table, per_run[chosen])
    for item in overrides:
        _apply_override(table, item)
    data = table.get("data")
    if path is not None and isinstance(data, dict) and isinstance(data.get("source"), str):
        data["source"] = _beside(resolve_config(path), data["source"])
    return table


def _beside(config: Path, source: str) -> str:
    """A relative data path that the working directory lacks but the config's directory holds, as
    that path (so a config and its data travel together); anything else unchanged."""
    path = Path(source)
    if source == "tasks" or path.is_absolute() or path.exists() or not (config.parent / path).exists():
        return source
    return str((config.parent / path).resolve())


def _method_name(table: dict[str, Any], overrides: list[str]) -> Any:
    """The method a run of this file with these overrides uses (its [compare.<method>] settings apply)."""
    probe = {"method": dict(table.get("method", {})) if isinstance(table.get("method"), dict) else {}}
    for item in overrides:
        if item.split("=", 1)[0].strip() == "method.name":
            _apply_override(probe, item)
    name = probe["method"].get("name", MethodConfig.name)
    return name if name in METHOD_NAMES else None


def compare_variants(path: str | Path | None) -> list[str]:
    """The named variants a config file defines (its `[compare.<name>]` tables that are not methods)."""
    per_run = _compare_tables(_read_table(path).get("compare", {}))
    return [name for name in per_run if name not in METHOD_NAMES]


def resolve_config(path: str | Path) -> Path:
    """`path` when it exists, else the built-in example it names (`smoke`, `smoke.toml` or
    `examples/smoke.toml`), from any directory, as `thinwire run` finds its default."""
    path = Path(path)
    if path.is_file() or not (len(path.parts) == 1 or path.parent.name == "examples"):
        return path
    builtin = EXAMPLES / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    return builtin if builtin.is_file() else path


def _read_table(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = resolve_config(path)
    if not path.is_file():
        builtins = ", ".join(sorted(p.stem for p in EXAMPLES.glob("*.toml")))
        raise UsageError(f"config file {path} does not exist; pass an existing TOML file or a built-in "
                         f"example ({builtins})")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}; pass a readable TOML file") from exc


def _compare_tables(raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise UsageError("config [compare] must hold one table per method or variant, like [compare.fedit.train]")
    for name, sections in raw.items():
        bad = sorted(k for k, v in sections.items() if k not in SECTIONS or not isinstance(v, dict))
        if bad:
            raise UsageError(f"config table [compare.{name}] may only hold section tables "
                             f"([compare.{name}.train] etc.), not {bad[0]!r}")
        if name in METHOD_NAMES:
            continue
        if not VARIANT_NAME.fullmatch(name):
            raise UsageError(f"variant name {name!r} in [compare] must use only letters, digits and . _ + -")
        if "name" not in sections.get("method", {}):
            raise UsageError(f"config table [compare.{name}] is neither a method nor a variant: "
                             f"set [compare.{name}.method] name = \"<method>\" to make it a variant")
    return raw


def _merge_tables(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge_tables(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def from_dict(table: dict[str, Any]) -> Config:
    unknown = set(table) - set(SECTIONS)
    if unknown:
        raise UsageError(f"unknown config section [{sorted(unknown)[0]}]; sections are "
                         + ", ".join(f"[{s}]" for s in SECTIONS))
    sections = {}
    for name in SECTIONS:
        raw = table.get(name, {})
        if not isinstance(raw, dict):
            raise UsageError(f"config [{name}] must be a table")
        cls = _section_class(name)
        if name == "method":
            raw = dict(raw)
            options = {k: raw.pop(k) for k in list(raw) if isinstance(raw[k], dict)}
            privacy = table.get("privacy") if isinstance(table.get("privacy"), dict) else {}
            private = privacy.get("dp", "none") != "none" or privacy.get("secagg") is True
            if private:  # under DP or SecAgg a client's weight must not depend on what it claims
                raw.setdefault("weighting", "equal")
                raw.setdefault("aggregation", "mean")  # DP clips each update; SecAgg shows only the sum
            section = parse_section(cls, raw, name)
            section.options = _method_options(section.name, options)
        elif name == "train":
            method = sections["method"]
            section = parse_section(cls, {**_method_train_defaults(method.name, method.options), **raw}, name)
        else:
            section = parse_section(cls, raw, name)
        sections[name] = section
    config = Config(**sections)
    _check_cross_fields(config)
    return config


def parse_section(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from `raw`, checking names, types and ranges."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "options"}
    unknown = set(raw) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        raise UsageError(f"unknown config key {prefix}.{key}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _check_value(f"{prefix}.{name}", value, hints[name], fields[name].metadata)
    return cls(**values)


def _section_class(name: str) -> type:
    return typing.get_type_hints(Config)[name]


def _check_value(key: str, value: Any, hint: Any, meta: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list) or not all(_is_type(v, item_type) for v in value):
            example = '["a", "b"]' if item_type is str else "[1, 2]"
            raise UsageError(f"config key {key} must be a list of {item_type.__name__}, like "
                             f"{key.rsplit('.', 1)[-1]} = {example} in TOML, or --set {key}='{example}' "
                             "(the quotes keep the shell off the brackets)")
        return list(value)
    if origin in (typing.Union, types.UnionType):
        if value is None or any(_is_type(value, t) for t in typing.get_args(hint) if t is not type(None)):
            return value
        raise UsageError(f"config key {key} has the wrong type {type(value).__name__}")
    if not _is_type(value, hint):
        raise UsageError(f"config key {key} must be {hint.__name__}, got {value!r}")
    if hint is float:
        value = float(value)
        if not math.isfinite(value):
            raise UsageError(f"config key {key} = {value!r} is not a finite number")
    choices, low, high = meta.get("choices"), meta.get("low"), meta.get("high")
    if choices and value not in choices:
        raise UsageError(f"config key {key} = {value!r} is not one of: {', '.join(map(str, choices))}")
    if low is not None and value < low:
        raise UsageError(f"config key {key} = {value!r} is below its minimum {low}")
    if high is not None and value > high:
        raise UsageError(f"config key {key} = {value!r} is above its maximum {high}; lower it")
    return value


def _is_type(value: Any, hint: Any) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _method_options(method: str, options: dict[str, dict]) -> dict[str, Any]:
    """Validate `[method.<name>]` tables against each method's options dataclass."""
    classes = option_classes()
    parsed = {}
    for name, raw in options.items():
        if name not in classes:
            raise UsageError(f"unknown config table [method.{name}]; methods with options: "
                             + ", ".join(sorted(classes)))
        parsed[name] = dataclasses.asdict(parse_section(classes[name], raw, f"method.{name}"))
    if method in classes and method not in parsed:
        parsed[method] = dataclasses.asdict(classes[method]())
    return parsed


def _method_train_defaults(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The `[train]` values `method` is meant to run with when the config does not set them."""
    return train_defaults(method, options)


# a method whose options live in another method's table ([method.fedkseed] configures fedkseed-pro)
OPTIONS_TABLE = {"fedkseed-pro": "fedkseed"}


def ignored_options_notice(config: Config, overrides: list[str]) -> str | None:
    """A one-line notice when `--set` gives options of a method other than the one running. A file's
    [method.<name>] tables stay silent: a file may hold settings for each method `compare` runs."""
    running = OPTIONS_TABLE.get(config.method.name, config.method.name)
    tables = sorted({parts[1] for item in overrides
                     if len(parts := item.split("=", 1)[0].strip().split(".")) > 2 and parts[0] == "method"
                     and parts[1] != running})
    if not tables:
        return None
    named = ", ".join(f"[method.{name}]" for name in tables)
    return (f"notice: --set options of {named} do not apply: method.name is {config.method.name!r} "
            "(set method.name to run that method)")


def method_options(config: Config, method: str, cls: type) -> Any:
    """The validated options dataclass of `method` (its defaults when the table is absent)."""
    return cls(**config.method.options.get(method, {}))


def _check_cross_fields(config: Config) -> None:
    fed = config.federation
    generated = config.data.examples_per_client * fed.clients
    if config.data.source == "tasks" and generated > MAX_SUITE_EXAMPLES:
        raise UsageError(f"data.examples_per_client = {config.data.examples_per_client} x federation.clients = "
                         f"{fed.clients} asks for {generated} built-in examples, above the bound "
                         f"{MAX_SUITE_EXAMPLES}; lower either")
    if fed.clients_per_round > fed.clients:
        raise UsageError(f"config key federation.clients_per_round = {fed.clients_per_round} exceeds "
                         f"federation.clients = {fed.clients}; lower it or add clients")
    if fed.min_replies > fed.clients_per_round:
        raise UsageError(f"config key federation.min_replies = {fed.min_replies} exceeds "
                         f"federation.clients_per_round = {fed.clients_per_round}; lower it or sample more clients")
    if config.train.momentum and config.train.optimizer != "sgd":
        raise UsageError(f"config key train.momentum = {config.train.momentum} applies to SGD only; set "
                         "train.optimizer = 'sgd' or leave train.momentum at 0")
    from thinwire.privacy import check_privacy

    check_privacy(config)


def _apply_override(table: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise UsageError(f"--set {item!r} must look like section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise UsageError(f"--set {item!r} must name a section and a key, like train.lr=1e-4")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    node = table
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"--set {item!r}: {part} is not a table")
    node[parts[-1]] = value


def to_toml(config: Config) -> str:
    """The fully resolved config as TOML, readable back by `load_config`."""
    lines = []
    data = dataclasses.asdict(config)
    for section, values in data.items():
        options = values.pop("options", {})
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
        for name, table in options.items():
            lines.append(f"[{section}.{name}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
            lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else str(value)
    return str(value)
