"""Held-out loss, batched greedy generation, Rouge-L F1 and exact match: per example (the records a
run keeps in `predictions.jsonl`), per split and per task."""

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
def example_losses(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict],
                   batch_size: int, max_length: int) -> list[tuple[float, int]]:
    """Per example: (summed loss over its response tokens, how many there are)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        encoded = [encode_example(tokenizer, e, max_length) for e in examples[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(encoded, tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        out.extend(zip(losses.sum(1).tolist(), (labels != IGNORE_INDEX).sum(1).tolist()))
    return out


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


def score_examples(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict],
                   cfg: EvalConfig, max_length: int, split: str = "") -> list[dict]:
    """One record per evaluated example (the first `cfg.max_examples`): its split, task, reference,
    summed loss and response tokens; with generation also its prediction, exact match and Rouge-L."""
    examples = examples[: cfg.max_examples]
    losses = example_losses(model, tokenizer, examples, cfg.batch_size, max_length)
    records = [{"split": split, "task": e.get("task", ""), "instruction": e.get("instruction", ""),
                "input": e.get("input", ""), "reference": e["output"], "loss_sum": total, "tokens": count}
               for e, (total, count) in zip(examples, losses)]
    if cfg.generate:
        for record, prediction in zip(records, generate(model, tokenizer, examples, cfg.batch_size,
                                                        cfg.max_new_tokens)):
            record.update(prediction=prediction, exact_match=exact_match(prediction, record["reference"]),
                          rougeL=rouge_l(prediction, record["reference"]))
    return records


def summarise(records: list[dict]) -> dict[str, float]:
    """Metrics of scored examples: token-weighted loss; mean Rouge-L and exact match if generated."""
    result = {"loss": sum(r["loss_sum"] for r in records) / max(sum(r["tokens"] for r in records), 1)}
    if records and "prediction" in records[0]:
        result["rougeL"] = sum(r["rougeL"] for r in records) / len(records)
        result["exact_match"] = sum(r["exact_match"] for r in records) / len(records)
    return result


def score_splits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, splits: dict[str, list[dict]],
                 cfg: EvalConfig, max_length: int) -> list[dict]:
    """`score_examples` over every split (records carry the split's prefix, e.g. "heldout_")."""
    return [r for prefix, examples in splits.items()
            for r in score_examples(model, tokenizer, examples, cfg, max_length, prefix)]


def _grouped(records: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record[key], []).append(record)
    return groups


def split_metrics(records: list[dict]) -> dict[str, float]:
    """Each split's `summarise`, its keys carrying the split's prefix (e.g. heldout_rougeL)."""
    return {prefix + k: v for prefix, group in _grouped(records, "split").items() for k, v in summarise(group).items()}


def evaluate_splits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, splits: dict[str, list[dict]],
                    cfg: EvalConfig, max_length: int) -> dict[str, float]:
    """Evaluate every split; a split's metrics carry its prefix (e.g. heldout_rougeL)."""
    return split_metrics(score_splits(model, tokenizer, splits, cfg, max_length))


def by_task(records: list[dict]) -> dict[str, dict[str, float]]:
    """`summarise` per task of the main split's records (examples without a task are left out)."""
    main = [r for r in records if r["split"] == "" and r["task"]]
    return {task: {"n": float(len(group)), **summarise(group)} for task, group in _grouped(main, "task").items()}
