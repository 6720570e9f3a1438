"""`thinwire export`: a finished run as artifacts other tools load, and `thinwire generate` from any of them.

- LoRA methods (fedit, cgfedllm, ferret over an adapter): a PEFT adapter directory
  (`PeftModel.from_pretrained` / `AutoPeftModelForCausalLM`). Its `base_model_name_or_path` names
  a base that loads on this machine: the hub id or local directory the run used, the prepared
  SmolLM2 cache, or, for a model built in code (tiny), a copy saved in `base/` beside the adapter.
- Full-parameter methods (fedavg, ferret, fedkseed), or any LoRA method with `--merge`: a Hugging
  Face model directory with its tokenizer (`AutoModelForCausalLM.from_pretrained`).
- FedPT: its proxy-tuned large model, the run's `proxy/` directory.

Everything is written to a temporary directory beside `--out` and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from thinwire.data.template import template_of, use_template
from thinwire.errors import UsageError

PROXY_DIR = "proxy"
STATE_FILE = "final_state.safetensors"
EXPORT_FILE = "thinwire.json"  # what thinwire needs beside the Hugging Face files: the prompt template


def export_run(run_dir: Path, out: Path, merge: bool = False) -> str:
    """Write `run_dir`'s final model to `out`; returns what was written: adapter, model or proxy."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.toml").is_file() or not (run_dir / "summary.json").is_file():
        raise UsageError(f"{run_dir} is not a finished run directory (no config.toml and summary.json); "
                         "pass the --out of a finished `thinwire run`")
    if out.exists():
        raise UsageError(f"{out} already exists; pass a new --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        if (run_dir / PROXY_DIR).is_dir():
            shutil.copytree(run_dir / PROXY_DIR, tmp, dirs_exist_ok=True)
            kind = "proxy"
        else:
            kind = _export_weights(run_dir, tmp, out, merge)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return kind


def _export_weights(run_dir: Path, tmp: Path, final: Path, merge: bool) -> str:
    if not (run_dir / STATE_FILE).is_file():
        raise UsageError(f"{run_dir} has no {STATE_FILE}; it was written by an older thinwire or is incomplete")
    workbench, model, lora = _run_model(run_dir)
    (tmp / EXPORT_FILE).write_text(json.dumps({"template": template_of(workbench.tokenizer)}) + "\n")
    if lora and not merge:
        model.peft_config["default"].base_model_name_or_path = _adapter_base(workbench.config.model.name,
                                                                              workbench, tmp, final)
        model.save_pretrained(str(tmp))
        workbench.tokenizer.save_pretrained(str(tmp))
        return "adapter"
    plain = model.merge_and_unload() if lora else model
    _save_model(plain, workbench.tokenizer, tmp)
    return "model"


def _run_model(run_dir: Path):
    """(workbench, model, whether it is LoRA) with a finished run's final trainable state loaded."""
    from safetensors.torch import load_file

    from thinwire.config import load_config
    from thinwire.methods.base import Workbench, load_into

    state = load_file(str(run_dir / STATE_FILE))
    workbench = Workbench(load_config(run_dir / "config.toml"))
    lora = any("lora_" in name for name in state)
    model, params = workbench.trainable(lora)
    load_into(params, state)
    return workbench, model, lora


def _adapter_base(name: str, workbench, tmp: Path, final: Path) -> str:
    """Where the adapter's base model loads from on this machine (a copy in `base/` if nowhere)."""
    from thinwire.models import BUILTIN

    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name == "smollm2-135m":
        from thinwire.models.smollm2 import prepared_dir

        return str(prepared_dir().resolve())
    if name not in BUILTIN and path.suffix != ".gguf":
        return name  # a hub id
    from thinwire.models import load_model

    base, tokenizer = load_model(workbench.config.model, workbench.config.federation.seed)  # unwrapped
    _save_model(base, tokenizer, tmp / "base")
    return str((final / "base").resolve())


def _save_model(model, tokenizer, directory: Path) -> None:
    try:
        model.save_pretrained(str(directory), safe_serialization=True)
    except (TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"this model cannot be saved in Hugging Face format ({exc}); "
                         "export a run of a standard model") from exc
    tokenizer.save_pretrained(str(directory))


def load_for_generation(directory: Path):
    """(model with a `generate` method, tokenizer) from a run directory or an export."""
    from thinwire.proxy import PROXY_FILE, load_proxy

    directory = Path(directory)
    if (directory / PROXY_FILE).is_file():
        return load_proxy(directory)
    if (directory / PROXY_DIR / PROXY_FILE).is_file():
        return load_proxy(directory / PROXY_DIR)
    if (directory / "adapter_config.json").is_file() or (directory / "config.json").is_file():
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loader = AutoPeftModelForCausalLM if (directory / "adapter_config.json").is_file() else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        info = json.loads((directory / EXPORT_FILE).read_text()) if (directory / EXPORT_FILE).is_file() else {}
        use_template(tokenizer, info.get("template", "alpaca"))  # the prompt template the model was tuned with
        return loader.from_pretrained(str(directory)).eval(), tokenizer
    if (directory / STATE_FILE).is_file() and (directory / "config.toml").is_file():
        workbench, model, _ = _run_model(directory)
        return model, workbench.tokenizer
    raise UsageError(f"{directory} is neither a run directory nor an export (no {STATE_FILE}, "
                     f"adapter_config.json, config.json or {PROXY_FILE}); pass one of those")


def describe(directory: Path) -> str:
    """One line saying what an export directory holds (for the CLI)."""
    directory = Path(directory)
    if (directory / "adapter_config.json").is_file():
        base = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return f"PEFT adapter over {base}"
    if (directory / "config.json").is_file():
        return "Hugging Face model directory with its tokenizer"
    return "FedPT proxy (thinwire generate loads it)"
