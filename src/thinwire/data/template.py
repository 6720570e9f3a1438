"""Prompt templates (Alpaca, or the tokenizer's own chat template) and tokenisation with the
prompt masked out of the loss.

The template in use travels with the tokenizer (`use_template` sets it once, where the run loads
its model), because every place that encodes or generates text already holds the tokenizer:
training batches, evaluation, generation, FedPT's distillation prompts.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from thinwire.errors import UsageError

IGNORE_INDEX = -100
_ATTR = "thinwire_template"

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def use_template(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """Resolve `data.template` for this tokenizer ("auto": its chat template when it has one) and
    attach it; returns "alpaca" or "chat"."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise UsageError("data.template = 'chat' but this model's tokenizer has no chat template; "
                         "use data.template = 'alpaca' or 'auto'")
    resolved = "chat" if template == "chat" or (template == "auto" and has_chat) else "alpaca"
    setattr(tokenizer, _ATTR, resolved)
    return resolved


def template_of(tokenizer: PreTrainedTokenizerBase | None) -> str:
    return getattr(tokenizer, _ATTR, "alpaca")


def _user_message(example: dict) -> list[dict]:
    text = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
    return [{"role": "user", "content": text}]


def render_prompt(example: dict, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The prompt text in the tokenizer's template (Alpaca without a tokenizer), ending where the
    response starts."""
    if template_of(tokenizer) == "chat":
        return tokenizer.apply_chat_template(_user_message(example), add_generation_prompt=True, tokenize=False)
    template = PROMPT_WITH_INPUT if example.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=example["instruction"], input=example.get("input", ""))


def _response_ids(tokenizer: PreTrainedTokenizerBase, example: dict, prompt: str) -> list[int]:
    """The response's tokens and what ends it: EOS (Alpaca) or the chat template's end of turn."""
    if template_of(tokenizer) == "chat":
        full = tokenizer.apply_chat_template(
            _user_message(example) + [{"role": "assistant", "content": example["output"]}], tokenize=False)
        if not full.startswith(prompt):
            raise UsageError("the tokenizer's chat template renders the prompt differently inside a conversation; "
                             "use data.template = 'alpaca'")
        return tokenizer(full[len(prompt):].rstrip("\n"), add_special_tokens=False)["input_ids"]
    return tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, examples: list[dict]) -> dict[str, torch.Tensor]:
    """Left-padded prompts in the tokenizer's template, ready for `generate`."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer([render_prompt(e, tokenizer) for e in examples], return_tensors="pt", padding=True,
                         add_special_tokens=template_of(tokenizer) == "alpaca")
    finally:
        tokenizer.padding_side = side


def encode_example(tokenizer: PreTrainedTokenizerBase, example: dict, max_length: int) -> dict:
    """Token ids and labels; the response keeps up to half the budget, the prompt is cut on the left."""
    text = render_prompt(example, tokenizer)
    prompt = tokenizer(text, add_special_tokens=template_of(tokenizer) == "alpaca")["input_ids"]
    response = _response_ids(tokenizer, example, text)
    response = response[: max(1, max_length // 2)]
    prompt = prompt[-(max_length - len(response)):]
    return {
        "input_ids": prompt + response,
        "labels": [IGNORE_INDEX] * len(prompt) + response,
    }


def collate(encoded: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch."""
    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_targets(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a response token: where a causal LM's logits are scored."""
    target = torch.zeros_like(labels, dtype=torch.bool)
    target[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return target
