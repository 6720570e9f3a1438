"""The method registry: name -> (server side, client side, options dataclass).

A leaf of the import graph: method modules load by name when first asked for, so the config
can validate against the registry without importing torch or any method."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from thinwire.errors import UsageError

# name -> (module, server class, client class, options class or None)
_REGISTRY = {
    "fedavg": ("thinwire.methods.fedavg", "DeltaServer", "DeltaClient", None),
    "fedit": ("thinwire.methods.fedavg", "FedITServer", "FedITClient", None),
    "fedkseed": ("thinwire.methods.fedkseed", "FedKSeedServer", "FedKSeedClient", "FedKSeedOptions"),
    "fedkseed-pro": ("thinwire.methods.fedkseed", "FedKSeedProServer", "FedKSeedProClient", None),
    "ferret": ("thinwire.methods.ferret", "FerretServer", "FerretClient", "FerretOptions"),
    "fedpt": ("thinwire.methods.fedpt", "FedPTServer", "FedPTClient", "FedPTOptions"),
    "cgfedllm": ("thinwire.methods.cgfedllm", "CGFedLLMServer", "CGFedLLMClient", "CGFedLLMOptions"),
    "ffa-lora": ("thinwire.methods.ffalora", "FFALoRAServer", "FFALoRAClient", None),
    "fed-sb": ("thinwire.methods.fedsb", "FedSBServer", "FedSBClient", "FedSBOptions"),
    "hetlora": ("thinwire.methods.hetlora", "HetLoRAServer", "HetLoRAClient", "RankOptions"),
    "flora": ("thinwire.methods.flora", "FLoRAServer", "FLoRAClient", "RankOptions"),
}

METHOD_NAMES = tuple(_REGISTRY)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    server: type
    client: type
    options: type | None


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    module_name, server, client, options = _REGISTRY[name]
    module = importlib.import_module(module_name)
    return MethodSpec(name, getattr(module, server), getattr(module, client),
                      getattr(module, options) if options else None)


def option_classes() -> dict[str, type]:
    """Options dataclass of every method that has one (config validates `[method.<name>]`)."""
    return {name: spec.options for name in _REGISTRY if (spec := get_method(name)).options is not None}


def train_defaults(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The `[train]` values method `name` runs with unless the config sets them (an unknown name: none)."""
    if name not in _REGISTRY:
        return {}
    return get_method(name).server.train_defaults(options)
