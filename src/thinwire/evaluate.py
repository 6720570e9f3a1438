"""Held-out loss, batched greedy generation, Rouge-L F1 and exact match: per example (the records a
run keeps in `predictions.jsonl`), per split and per task.

Scores measure the task as written, case included:

- ``exact_match``: prediction and reference are equal character for character after whitespace
  normalisation only (runs of whitespace become one space, ends stripped). "Tiger Parrot" is not
  an exact match for "TIGER PARROT".
- ``rougeL``: Rouge-L F1 over case-preserving tokens (ROUGE-1.5.5's tokenisation, runs of ASCII
  letters and digits, without its lowercasing), so "Tiger" and "TIGER" are different tokens.
- ``exact_match_folded`` / ``rougeL_folded``: the same scores after lowercasing both sides (the
  rouge_score default tokenizer). They are kept as separate, clearly named metrics because they say
  how close an answer came up to case; they are not the task's score: echoing the input scores 1.0
  folded on ``uppercase`` and ``swap-case`` and 0.0 exactly. A folded score equals the exact score
  of the lowercased texts.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from rouge_score import rouge_scorer, tokenizers
from transformers import PreTrainedTokenizerBase

from thinwire.config import EvalConfig
from thinwire.data.template import IGNORE_INDEX, collate, encode_example, encode_prompts

class CaseTokenizer(tokenizers.Tokenizer):
    """ROUGE-1.5.5's tokenisation (rouge_score's default: runs of ASCII letters and digits, every
    other character a separator) without lowercasing."""

    _SEPARATORS = re.compile(r"[^A-Za-z0-9]+")

    def tokenize(self, text: str) -> list[str]:
        return [t for t in self._SEPARATORS.split(text) if t]


OnBatch = Callable[[int], None] | None  # told how many examples a batch just finished (progress)
_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=CaseTokenizer())
_FOLDED_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)  # lowercases both sides


def normalise(text: str) -> str:
    """Whitespace normalisation only: runs of whitespace become one space, ends are stripped."""
    return re.sub(r"\s+", " ", text).strip()


def fold(text: str) -> str:
    """`normalise`, then lowercase: what the ``*_folded`` metrics compare."""
    return normalise(text).lower()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if equal case and character for character after whitespace normalisation, else 0.0."""
    return float(normalise(prediction) == normalise(reference))


def exact_match_folded(prediction: str, reference: str) -> float:
    """`exact_match` of the lowercased texts (case ignored; not the task's score)."""
    return float(fold(prediction) == fold(reference))


def _rouge(scorer: rouge_scorer.RougeScorer, prediction: str, reference: str) -> float:
    if not normalise(reference):
        return float(not normalise(prediction))
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 over case-preserving tokens (see `CaseTokenizer`)."""
    return _rouge(_SCORER, prediction, reference)


def rouge_l_folded(prediction: str, reference: str) -> float:
    """Rouge-L F1 with rouge_score's default, lowercasing tokenizer (case ignored)."""
    return _rouge(_FOLDED_SCORER, prediction, reference)


def score_prediction(prediction: str, reference: str) -> dict[str, float]:
    """Every per-example score of one prediction, exact and folded."""
    return {"exact_match": exact_match(prediction, reference), "rougeL": rouge_l(prediction, reference),
            "exact_match_folded": exact_match_folded(prediction, reference),
            "rougeL_folded": rouge_l_folded(prediction, reference)}


@torch.no_grad()
def example_losses(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict],
                   batch_size: int, max_length: int, on_batch: OnBatch = None) -> list[tuple[float, int]]:
    """Per example: (summed loss over its response tokens, how many there are); `on_batch(n)` after
    each batch of n examples (progress)."""
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
        if on_batch:
            on_batch(len(encoded))
    return out


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict],
             batch_size: int, max_new_tokens: int, on_batch: OnBatch = None) -> list[str]:
    """Greedy continuations of the rendered prompts, left-padded in batches; `on_batch(n)` after each
    batch of n examples."""
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(examples), batch_size):
        batch = encode_prompts(tokenizer, examples[start : start + batch_size]).to(device)
        tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outputs.extend(tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
        if on_batch:
            on_batch(tokens.shape[0])
    return [o.strip() for o in outputs]


def score_examples(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict],
                   cfg: EvalConfig, max_length: int, split: str = "", on_batch: OnBatch = None) -> list[dict]:
    """One record per evaluated example (the first `cfg.max_examples`): its split, task, reference,
    summed loss and response tokens; with generation also its prediction and `score_prediction`'s
    scores (exact match and Rouge-L, exact and case-folded)."""
    examples = examples[: cfg.max_examples]
    losses = example_losses(model, tokenizer, examples, cfg.batch_size, max_length, on_batch)
    records = [{"split": split, "task": e.get("task", ""), "instruction": e.get("instruction", ""),
                "input": e.get("input", ""), "reference": e["output"], "loss_sum": total, "tokens": count}
               for e, (total, count) in zip(examples, losses)]
    if cfg.generate:
        for record, prediction in zip(records, generate(model, tokenizer, examples, cfg.batch_size,
                                                        cfg.max_new_tokens, on_batch)):
            record.update(prediction=prediction, **score_prediction(prediction, record["reference"]))
    return records


_SCORE_KEYS = ("rougeL", "exact_match", "rougeL_folded", "exact_match_folded")


def summarise(records: list[dict]) -> dict[str, float]:
    """Metrics of scored examples: token-weighted loss; if generated, the mean Rouge-L and exact match
    (case-exact) and, where the records carry them, their case-folded means (`*_folded`)."""
    result = {"loss": sum(r["loss_sum"] for r in records) / max(sum(r["tokens"] for r in records), 1)}
    if records and "prediction" in records[0]:
        for key in _SCORE_KEYS:
            if all(key in r for r in records):
                result[key] = sum(r[key] for r in records) / len(records)
    return result


def score_splits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, splits: dict[str, list[dict]],
                 cfg: EvalConfig, max_length: int, on_batch: OnBatch = None) -> list[dict]:
    """`score_examples` over every split (records carry the split's prefix, e.g. "heldout_");
    `on_batch` counts the `evaluation_work` done."""
    return [r for prefix, examples in splits.items()
            for r in score_examples(model, tokenizer, examples, cfg, max_length, prefix, on_batch)]


def evaluation_work(splits: dict[str, list[dict]], cfg: EvalConfig) -> int:
    """How many example passes `score_splits` makes (loss, and generation when on): its progress total."""
    return sum(min(len(examples), cfg.max_examples) for examples in splits.values()) * (2 if cfg.generate else 1)


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
