"""Held-out loss, batched greedy generation, Rouge-L F1 and exact match."""

from __future__ import annotations

import re

import torch
from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerBase

from thinwire.config import EvalConfig
from thinwire.data.template import IGNORE_INDEX, collate, encode_example, render_prompt

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def rouge_l(prediction: str, reference: str) -> float:
    if not normalise(reference):
        return float(not normalise(prediction))
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict],
                  batch_size: int, max_length: int) -> float:
    """Mean per-token loss over response tokens of all examples (token-weighted)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        encoded = [encode_example(tokenizer, e, max_length) for e in examples[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(encoded, tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        total += losses.item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict],
             batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations of the rendered prompts, left-padded in batches."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for start in range(0, len(examples), batch_size):
            prompts = [render_prompt(e) for e in examples[start : start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
            new = tokens[:, batch["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in outputs]


def evaluate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict],
             cfg: EvalConfig, max_length: int) -> dict[str, float]:
    examples = examples[: cfg.max_examples]
    result = {"loss": held_out_loss(model, tokenizer, examples, cfg.batch_size, max_length)}
    if cfg.generate:
        predictions = generate(model, tokenizer, examples, cfg.batch_size, cfg.max_new_tokens)
        references = [e["output"] for e in examples]
        result["rougeL"] = sum(map(rouge_l, predictions, references)) / len(examples)
        result["exact_match"] = sum(map(exact_match, predictions, references)) / len(examples)
    return result


def evaluate_splits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, splits: dict[str, list[dict]],
                    cfg: EvalConfig, max_length: int) -> dict[str, float]:
    """Evaluate every split; a split's metrics carry its prefix (e.g. heldout_rougeL)."""
    result = {}
    for prefix, examples in splits.items():
        result.update({prefix + k: v for k, v in evaluate(model, tokenizer, examples, cfg, max_length).items()})
    return result
