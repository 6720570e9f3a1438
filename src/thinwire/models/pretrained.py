"""Loading a Hugging Face model directory (or hub id, or GGUF file) and its tokenizer, with one
clear error when that fails."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from thinwire.errors import UsageError


def from_pretrained(source: str, local_only: bool, gguf_file: str | None = None
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    hf_logging.disable_progress_bar()
    kwargs = {"local_files_only": local_only}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load model {source!r}: {first}; check the name, "
                         "or pass a local directory when the hub is unreachable") from exc
    return model, tokenizer
