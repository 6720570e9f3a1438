"""Scores measure the task: exact match and Rouge-L keep case; the case-folded scores are separate."""

import pytest

from thinwire.config import EvalConfig
from thinwire.data.tasks import generate
from thinwire.evaluate import (exact_match, exact_match_folded, rouge_l, rouge_l_folded, score_examples,
                               score_prediction, split_metrics, summarise)


@pytest.mark.parametrize("family", ["uppercase", "swap-case"])
def test_echoing_the_input_scores_zero_exact_match_on_case_families(family):
    examples = generate(family, 50, seed=0)
    scores = [score_prediction(e["input"], e["output"]) for e in examples]
    assert all(s["exact_match"] == 0.0 for s in scores)
    assert all(s["exact_match_folded"] == 1.0 for s in scores)  # what the old, folded metric gave echo
    assert all(s["rougeL_folded"] == 1.0 for s in scores)
    # every echoed token differs from its reference token in case (lowercase words against their
    # uppercase; a mixed-case word against its swap), so no token is in common
    assert all(s["rougeL"] == 0.0 for s in scores)
    # and the right answer scores full marks either way
    right = [score_prediction(e["output"], e["output"]) for e in examples]
    assert all(s == {"exact_match": 1.0, "rougeL": 1.0, "exact_match_folded": 1.0, "rougeL_folded": 1.0}
               for s in right)


def test_exact_match_normalises_whitespace_only():
    assert exact_match("  TIGER \n\t PARROT ", "TIGER PARROT") == 1.0
    assert exact_match("Tiger Parrot", "TIGER PARROT") == 0.0
    assert exact_match("TIGER PARROT.", "TIGER PARROT") == 0.0  # punctuation is a character too
    assert exact_match_folded("Tiger  Parrot", "TIGER PARROT") == 1.0
    assert exact_match_folded("Tiger Parrot.", "TIGER PARROT") == 0.0


def test_rouge_l_keeps_case_hand_computed():
    # tokens: ref [The, Cat, sat], pred [the, cat, sat]; LCS = [sat]: P = R = 1/3, F1 = 1/3
    assert rouge_l("the cat sat", "The Cat sat") == pytest.approx(1 / 3)
    assert rouge_l_folded("the cat sat", "The Cat sat") == pytest.approx(1.0)
    # pred [new, York, city, is, big], ref [New, York, City]: LCS = [York]: P = 1/5, R = 1/3, F1 = 1/4;
    # folded LCS = [new, york, city]: P = 3/5, R = 1, F1 = 2 * 0.6 / 1.6 = 3/4
    assert rouge_l("new York city is big", "New York City") == pytest.approx(0.25)
    assert rouge_l_folded("new York city is big", "New York City") == pytest.approx(0.75)
    # punctuation separates tokens, as in ROUGE-1.5.5: [a, b] vs [A, b] -> LCS [b]: F1 = 1/2
    assert rouge_l("a-b", "A, b") == pytest.approx(0.5)
    # an empty reference: only an empty prediction matches
    assert rouge_l("", "  ") == 1.0 and rouge_l("x", "") == 0.0


def test_summaries_carry_exact_and_folded_means():
    records = [{"split": "", "task": "a", "loss_sum": 2.0, "tokens": 2, "prediction": "Tiger",
                **score_prediction("Tiger", "TIGER")},
               {"split": "", "task": "a", "loss_sum": 1.0, "tokens": 1, "prediction": "LION",
                **score_prediction("LION", "LION")}]
    assert summarise(records) == {"loss": 1.0, "rougeL": 0.5, "exact_match": 0.5, "rougeL_folded": 1.0,
                                  "exact_match_folded": 1.0}
    assert split_metrics(records)["exact_match_folded"] == 1.0


def test_scored_examples_carry_both_scores():
    from thinwire.models.tiny import build_tiny

    model, tokenizer = build_tiny(0)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    examples = generate("uppercase", 2, seed=0)
    cfg = EvalConfig(max_examples=2, batch_size=2, generate=True, max_new_tokens=4)
    records = score_examples(model, tokenizer, examples, cfg, max_length=64)
    for r in records:
        assert r == {**r, **score_prediction(r["prediction"], r["reference"])}
        assert {"exact_match", "rougeL", "exact_match_folded", "rougeL_folded"} <= set(r)
