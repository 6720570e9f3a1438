"""`thinwire export`: a finished run as artifacts other tools load, and `thinwire generate` from any of them.

- LoRA methods (fedit, cgfedllm, ferret over an adapter): a PEFT adapter directory
  (`PeftModel.from_pretrained`). Its `base_model_name_or_path` names a base that loads wherever
  the export is moved: the hub id or (absolute) local directory the run used, the prepared SmolLM2
  cache, or, for a model built in code (tiny), `base`: a copy saved in `base/` inside the export,
  a path relative to the export directory (thinwire's loader and the README's snippet resolve it
  there).
- Full-parameter methods (fedavg, ferret, fedkseed), or any LoRA method with `--merge`: a Hugging
  Face model directory with its tokenizer (`AutoModelForCausalLM.from_pretrained`).
- FedPT: its proxy-tuned large model, the run's `proxy/` directory.

Every export carries a README.md (how to load it, the exact prompt format it was trained on, a
copy-paste snippet), and a tokenizer whose chat template renders that format, so
`apply_chat_template` gives the trained prompt. Everything is written to a temporary directory
beside `--out`, given the permissions the umask allows, and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from thinwire.data.template import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, template_of, use_template
from thinwire.errors import UsageError

PROXY_DIR = "proxy"
STATE_FILE = "final_state.safetensors"
EXPORT_FILE = "thinwire.json"  # what thinwire needs beside the Hugging Face files: the prompt template
README_FILE = "README.md"
LOCAL_BASE = "base"  # a base model built in code, saved inside the export (adapter_config names it relatively)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers', peft's and the hub's progress bars, log messages and warnings off (export, generate)."""
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    verbosity = transformers.logging.get_verbosity()
    transformers_bars = transformers.logging.is_progress_bar_enabled()
    bars_were_off = are_progress_bars_disabled()
    peft_logger = logging.getLogger("peft")
    peft_level = peft_logger.level
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    disable_progress_bars()
    peft_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if transformers_bars:
            transformers.logging.enable_progress_bar()
        if not bars_were_off:
            enable_progress_bars()
        peft_logger.setLevel(peft_level)


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
            kind = _export_weights(run_dir, tmp, merge)
        (tmp / README_FILE).write_text(export_readme(tmp, out.resolve(), run_dir, kind))
        _umask_permissions(tmp)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return kind


def _export_weights(run_dir: Path, tmp: Path, merge: bool) -> str:
    if not (run_dir / STATE_FILE).is_file():
        raise UsageError(f"{run_dir} has no {STATE_FILE}; it was written by an older thinwire or is incomplete")
    workbench, model, lora = _run_model(run_dir)
    tokenizer = workbench.tokenizer
    (tmp / EXPORT_FILE).write_text(json.dumps({"template": template_of(tokenizer)}) + "\n")
    if template_of(tokenizer) == "alpaca":  # trained on Alpaca: apply_chat_template must render Alpaca
        tokenizer.chat_template = alpaca_chat_template(tokenizer)
    if lora and not merge:
        model.peft_config["default"].base_model_name_or_path = _adapter_base(workbench.config.model.name,
                                                                              workbench, tmp)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        return "adapter"
    plain = model.merge_and_unload() if lora else model
    _save_model(plain, tokenizer, tmp)
    return "model"


def alpaca_chat_template(tokenizer) -> str:
    """A Jinja chat template that renders one user turn exactly as training rendered its prompt
    (`render_prompt` with the Alpaca template, the BOS token included where the tokenizer adds
    one), and an assistant turn as the response followed by EOS. The task's input, if any, goes in
    the user message's `input` field: {"role": "user", "content": INSTRUCTION, "input": INPUT}."""
    def jinja(prompt: str) -> str:
        return prompt.replace("{instruction}", "{{ message['content'] }}").replace("{input}", "{{ message['input'] }}")

    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    bos = "{{ bos_token }}" if full[: len(full) - len(plain)] == [tokenizer.bos_token_id] else ""
    return (bos + "{% for message in messages %}{% if message['role'] == 'user' %}"
            "{% if message['input'] is defined and message['input'] %}" + jinja(PROMPT_WITH_INPUT)
            + "{% else %}" + jinja(PROMPT_NO_INPUT) + "{% endif %}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def _umask_permissions(root: Path) -> None:
    """Directories and files as the umask allows (a temporary directory is created 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~mask)


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


def _adapter_base(name: str, workbench, tmp: Path) -> str:
    """Where the adapter's base model loads from: a hub id or an absolute directory on this machine,
    or `base` (relative to the export) for a copy saved inside it when it exists nowhere else."""
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
    _save_model(base, tokenizer, tmp / LOCAL_BASE)
    return LOCAL_BASE


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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        info = json.loads((directory / EXPORT_FILE).read_text()) if (directory / EXPORT_FILE).is_file() else {}
        use_template(tokenizer, info.get("template", "alpaca"))  # the prompt template the model was tuned with
        if not (directory / "adapter_config.json").is_file():
            return AutoModelForCausalLM.from_pretrained(str(directory)).eval(), tokenizer
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(adapter_base_path(directory)))
        return PeftModel.from_pretrained(base, str(directory)).eval(), tokenizer
    if (directory / STATE_FILE).is_file() and (directory / "config.toml").is_file():
        workbench, model, _ = _run_model(directory)
        return model, workbench.tokenizer
    raise UsageError(f"{directory} is neither a run directory nor an export (no {STATE_FILE}, "
                     f"adapter_config.json, config.json or {PROXY_FILE}); pass one of those")


def adapter_base_path(directory: Path) -> str | Path:
    """The base model an exported adapter names: a directory inside the export (a relative name),
    or the hub id or absolute directory as written."""
    base = json.loads((Path(directory) / "adapter_config.json").read_text())["base_model_name_or_path"]
    inside = Path(directory) / base
    return inside if not Path(base).is_absolute() and inside.is_dir() else base


def export_readme(directory: Path, out: Path, run_dir: Path, kind: str) -> str:
    """README.md of an export: what it holds, how to load it, the exact prompt format it was trained
    on and a copy-paste snippet that generates with it."""
    from thinwire import __version__

    summary = json.loads((run_dir / "summary.json").read_text())
    info = json.loads((directory / EXPORT_FILE).read_text()) if (directory / EXPORT_FILE).is_file() else {}
    template = info.get("template", "alpaca")
    final = summary.get("final_eval", {})
    quality = ", ".join(f"{k} {final[k]:.4f}" for k in ("rougeL", "exact_match", "loss") if k in final)
    lines = [f"# {out.name}", "",
             f"Exported by thinwire {__version__} from the run `{run_dir.name}`: {summary['method']} on "
             f"{summary['model']}, {summary['rounds']} rounds; final evaluation: {quality or '-'}.", ""]
    from thinwire.runtime.display import random_model_note

    note = random_model_note(summary["model"])
    if note:
        lines += [f"Note: {note}.", ""]
    if kind == "proxy":
        return "\n".join(lines + [
            "This is a FedPT proxy-tuned model: a large model steered at every token by a small tuned proxy. "
            "It is not a single Hugging Face model; load and generate from it with thinwire:", "",
            "```sh", f"thinwire generate {out} \"Reverse the word.\" --input \"parrot\"", "```", "",
            *_prompt_section(template), ""])
    lines += [f"Contents: {describe(directory)}.", "", "## Load it and generate", "", "```python",
              *_snippet(directory, out, kind, template), "```", "", "Or with thinwire:", "", "```sh",
              f"thinwire generate {out} \"Reverse the word.\" --input \"parrot\"", "```", "",
              *_prompt_section(template)]
    if kind == "adapter":
        lines += ["", "## The base model", "",
                  "`adapter_config.json` names the base model the adapter was trained over. `base` means the copy "
                  "in `base/` inside this directory (the base was built in code): load it from there, as the "
                  "snippet does, wherever you move this directory. A hub id or an absolute path loads as it is."]
    return "\n".join(lines) + "\n"


def _snippet(directory: Path, out: Path, kind: str, template: str) -> list[str]:
    """Python that loads the export and generates one answer in the trained prompt format."""
    lines = ["from pathlib import Path", "", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if kind == "adapter":
        lines += ["from peft import PeftModel"]
    lines += ["", f"export = Path({str(out)!r})  # this directory: change it if you move it",
              "tokenizer = AutoTokenizer.from_pretrained(export)"]
    if kind == "adapter":
        base = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        where = f"export / {base!r}" if base == LOCAL_BASE else repr(base)
        lines += ["# the base model the adapter was trained over",
                  f"base = AutoModelForCausalLM.from_pretrained({where})",
                  "model = PeftModel.from_pretrained(base, export).eval()"]
    else:
        lines += ["model = AutoModelForCausalLM.from_pretrained(export).eval()"]
    if template == "alpaca":
        lines += ["# the trained Alpaca prompt: the task's input goes in the message's `input` field",
                  'messages = [{"role": "user", "content": "Reverse the word.", "input": "parrot"}]']
    else:
        lines += ["# the model's own chat template: the input follows the instruction after a blank line",
                  'messages = [{"role": "user", "content": "Reverse the word.\\n\\nparrot"}]']
    lines += ["inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',",
              "                                       return_dict=True)",
              "tokens = model.generate(**inputs, max_new_tokens=32, do_sample=False,",
              "                        pad_token_id=tokenizer.pad_token_id)",
              "print(tokenizer.decode(tokens[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))"]
    return lines


def _prompt_section(template: str) -> list[str]:
    if template != "alpaca":
        return ["## Prompt format", "",
                "The model was trained on its tokenizer's own chat template (`data.template`), one user turn "
                "holding the instruction, then a blank line and the input if there is one; "
                "`tokenizer.apply_chat_template(..., add_generation_prompt=True)` renders it."]
    return ["## Prompt format", "",
            "The model was trained on the Alpaca template (below, exactly, ending where the answer starts; the "
            "tokenizer adds its BOS token if it has one, and the answer ends with EOS). The tokenizer's chat "
            "template renders the same text: `apply_chat_template([{\"role\": \"user\", \"content\": INSTRUCTION, "
            "\"input\": INPUT}], add_generation_prompt=True)`; leave `input` out when the task has none. "
            "A different prompt format (the base model's own chat template, say) is not what it learned.", "",
            "With an input:", "", "```text", PROMPT_WITH_INPUT.rstrip("\n"), "```", "",
            "Without one:", "", "```text", PROMPT_NO_INPUT.rstrip("\n"), "```"]


def describe(directory: Path) -> str:
    """One line saying what an export directory holds (for the CLI)."""
    directory = Path(directory)
    if (directory / "adapter_config.json").is_file():
        base = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return f"PEFT adapter over {'the base model saved in base/' if base == LOCAL_BASE else base}"
    if (directory / "config.json").is_file():
        return "Hugging Face model directory with its tokenizer"
    return "FedPT proxy (thinwire generate loads it)"
