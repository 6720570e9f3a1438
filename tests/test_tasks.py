"""The built-in procedural instruction suite: shape, determinism, correctness, variety."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from thinwire.data import tasks
from thinwire.data.tasks import FAMILIES, categories, generate, generate_suite
from thinwire.errors import UsageError

KEYS = {"instruction", "input", "output", "category", "task"}

# Families whose whole input space is a small built-in table or range (40-odd countries,
# 12 months, 7 weekdays, ...): their inputs repeat by construction.
SMALL_INPUT_SPACE = {
    "capital-of",
    "chemical-symbol",
    "opposite-word",
    "plural-form",
    "month-name",
    "next-weekday",
    "next-letter",
    "celsius-to-fahrenheit",  # multiples of 5 from -60 to 200, so that degrees F are integers
}


def _digest(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------
# Shape of the registry
# --------------------------------------------------------------------------------------


def test_registry_size_and_categories():
    assert len(FAMILIES) >= 28
    cats = categories()
    assert len(cats) >= 5
    assert cats == sorted(set(cats))
    for cat in cats:
        assert len(tasks.families_in(cat)) >= 3, cat


def test_family_fields():
    for name, fam in FAMILIES.items():
        assert fam.name == name
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name
        assert fam.category in categories()
        assert fam.instruction.strip() and len(fam.instruction) < 300
        assert callable(fam.make)


def test_exempt_list_matches_module():
    assert SMALL_INPUT_SPACE == set(tasks.SMALL_INPUT_SPACE)
    assert SMALL_INPUT_SPACE <= set(FAMILIES)


def test_record_shape_and_short_outputs():
    for name, fam in FAMILIES.items():
        for ex in generate(name, 200, seed=3):
            assert set(ex) == KEYS
            assert ex["task"] == name
            assert ex["category"] == fam.category
            assert ex["instruction"] == fam.instruction
            assert all(isinstance(ex[k], str) for k in KEYS)
            assert ex["input"].strip(), name
            assert ex["output"].strip() and ex["output"] == ex["output"].strip(), name
            assert len(ex["output"]) <= 80, (name, ex["output"])
            assert "\n" not in ex["output"], name
            assert len(ex["input"]) <= 200, (name, ex["input"])


# --------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------


def test_deterministic_across_calls():
    assert generate_suite(20, seed=7) == generate_suite(20, seed=7)
    for name in FAMILIES:
        assert generate(name, 30, seed=11) == generate(name, 30, seed=11)


def test_deterministic_across_processes():
    expected = _digest(generate_suite(10, seed=123))
    code = (
        "import hashlib, json\n"
        "from thinwire.data.tasks import generate_suite\n"
        "print(hashlib.sha256(json.dumps(generate_suite(10, seed=123), sort_keys=True)"
        ".encode()).hexdigest())\n"
    )
    src = str(Path(tasks.__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONHASHSEED"] = "9876"  # this process's hash() salt is different (random or unset)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == expected


def test_prefix_property():
    for name in FAMILIES:
        full = generate(name, 50, seed=5)
        for m in (0, 1, 7, 50):
            assert generate(name, m, seed=5) == full[:m]


def test_different_seeds_differ():
    for name in FAMILIES:
        a = generate(name, 20, seed=0)
        b = generate(name, 20, seed=1)
        assert a != b, name
    for name in set(FAMILIES) - SMALL_INPUT_SPACE:
        a = {e["input"] for e in generate(name, 50, seed=0)}
        b = {e["input"] for e in generate(name, 50, seed=1)}
        assert len(a & b) <= 5, name  # train and eval seeds give mostly different examples


def test_families_are_independent_streams():
    # The same seed must not make every family start from the same random state.
    assert tasks.derived_seed("add", 0) != tasks.derived_seed("subtract", 0)
    assert tasks.derived_seed("add", 0) != tasks.derived_seed("add", 1)


def test_suite_is_concatenation_of_families():
    names = ["add", "capital-of", "reverse-word"]
    suite = generate_suite(4, seed=9, families=names)
    assert suite == sum((generate(n, 4, seed=9) for n in names), [])
    everything = generate_suite(2, seed=0)
    assert len(everything) == 2 * len(FAMILIES)
    assert [e["task"] for e in everything[::2]] == list(FAMILIES)


# --------------------------------------------------------------------------------------
# Variety
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in SMALL_INPUT_SPACE])
def test_inputs_mostly_distinct(name):
    inputs = [e["input"] for e in generate(name, 200, seed=0)]
    assert len(set(inputs)) >= 0.9 * len(inputs), (name, len(set(inputs)))


@pytest.mark.parametrize("name", sorted(SMALL_INPUT_SPACE))
def test_small_families_still_vary(name):
    inputs = {e["input"] for e in generate(name, 200, seed=0)}
    assert len(inputs) >= 7, name


# --------------------------------------------------------------------------------------
# Correctness, recomputed independently from the input
# --------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", s)]


def _items(s: str) -> list[str]:
    return s.split(", ")


def _pig(word: str) -> str:
    m = re.fullmatch(r"([^aeiou]*)(.*)", word)
    head, rest = m.group(1), m.group(2)
    return word + "way" if not head else rest + head + "ay"


def _decimal_times(s: str, factor: int) -> int:
    num = s.split()[0]
    whole, _, frac = num.partition(".")
    scaled = int(whole + frac) * factor
    assert scaled % (10 ** len(frac)) == 0
    return scaled // (10 ** len(frac))


def _hours_minutes(s: str) -> int:
    nums = _ints(s)
    h, m = (nums + [0])[:2]
    return 60 * h + m


WEEK = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _weekday(name: str) -> int:
    return WEEK.index(name)


CHECKS = {
    "reverse-word": lambda i, o: o == i[::-1],
    "uppercase": lambda i, o: o == i.upper() and i == i.lower(),
    "remove-vowels": lambda i, o: o == re.sub("[aeiou]", "", i) and o,
    "swap-case": lambda i, o: o == "".join(c.lower() if c.isupper() else c.upper() for c in i),
    "acronym": lambda i, o: o == "".join(w[0].upper() for w in i.split()),
    "pig-latin": lambda i, o: o == _pig(i),
    "repeat-word": lambda i, o: o.split() == [re.search(r"word: (\w+)", i).group(1)] * _ints(i)[0],
    "word-length": lambda i, o: int(o) == len(i),
    "add": lambda i, o: int(o) == sum(_ints(i)) and "+" in i,
    "subtract": lambda i, o: int(o) == _ints(i)[0] - int(i.split(" - ")[1]) >= 0,
    "multiply": lambda i, o: int(o) == _ints(i)[0] * _ints(i)[1],
    "add-three": lambda i, o: len(_ints(i)) == 3 and int(o) == sum(_ints(i)),
    "parity": lambda i, o: o == ("even" if int(i) % 2 == 0 else "odd"),
    "larger-number": lambda i, o: int(o) == max(_ints(i)) and len(set(_ints(i))) == 2,
    "divide": lambda i, o: int(o) * _ints(i)[1] == _ints(i)[0],
    "sort-numbers": lambda i, o: _ints(o) == sorted(_ints(i)),
    "max-number": lambda i, o: int(o) == max(_ints(i)),
    "min-number": lambda i, o: int(o) == min(_ints(i)),
    "count-items": lambda i, o: int(o) == len(_items(i)),
    "last-item": lambda i, o: o == _items(i)[-1],
    "deduplicate": lambda i, o: _items(o)
    == [w for k, w in enumerate(_items(i)) if w not in _items(i)[:k]]
    and len(_items(o)) < len(_items(i)),
    "reverse-list": lambda i, o: _items(o) == _items(i)[::-1],
    "sum-list": lambda i, o: int(o) == sum(_ints(i)),
    "extract-year": lambda i, o: re.findall(r"\d+", i) == [o] and 1800 <= int(o) <= 2099,
    "extract-number": lambda i, o: re.findall(r"\d+", i) == [o],
    "extract-email": lambda i, o: re.findall(r"[\w.]+@[\w.]+\w", i) == [o],
    "date-reformat": lambda i, o: o == datetime.date.fromisoformat(i).strftime("%d/%m/%Y"),
    "title-case": lambda i, o: o == i.title() and i == i.lower(),
    "camel-to-snake": lambda i, o: o == re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), i),
    "json-lookup": lambda i, o: o == str(json.loads(i.split("\n")[0])[i.split("key: ")[1]]),
    "month-name": lambda i, o: o == datetime.date(2000, int(i), 1).strftime("%B"),
    "next-weekday": lambda i, o: _weekday(o) == (_weekday(i) + 1) % 7,
    "next-letter": lambda i, o: ord(o) == ord(i) + 1 and o.isalpha(),
    "km-to-m": lambda i, o: int(o) == _decimal_times(i, 1000) and i.endswith(" km"),
    "kg-to-g": lambda i, o: int(o) == _decimal_times(i, 1000) and i.endswith(" kg"),
    "m-to-cm": lambda i, o: int(o) == _decimal_times(i, 100) and i.endswith(" m"),
    "hours-to-minutes": lambda i, o: int(o) == _hours_minutes(i),
    "celsius-to-fahrenheit": lambda i, o: int(o) * 5 == _ints(i)[0] * 9 + 160,
}

# Spot checks against well-known facts for the table families.
KNOWN = {
    "capital-of": {"France": "Paris", "Japan": "Tokyo", "Canada": "Ottawa", "Kenya": "Nairobi"},
    "chemical-symbol": {"gold": "Au", "iron": "Fe", "sodium": "Na", "oxygen": "O"},
    "opposite-word": {"hot": "cold", "cold": "hot", "up": "down", "true": "false"},
    "plural-form": {"child": "children", "mouse": "mice", "box": "boxes", "city": "cities"},
}


def test_every_family_is_checked_somewhere():
    assert set(CHECKS) | set(KNOWN) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_outputs_are_correct(name):
    check = CHECKS[name]
    for ex in generate(name, 300, seed=42):
        assert check(ex["input"], ex["output"]), (name, ex["input"], ex["output"])


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_lookup_tables(name):
    seen = {}
    for ex in generate(name, 2000, seed=0):
        assert seen.setdefault(ex["input"], ex["output"]) == ex["output"]  # a function
    for question, answer in KNOWN[name].items():
        assert seen.get(question) == answer, (name, question)


def test_opposites_are_unambiguous():
    # No word is both a question and the answer to a different question.
    pairs = {e["input"]: e["output"] for e in generate("opposite-word", 3000, seed=0)}
    for q, a in pairs.items():
        if a in pairs:
            assert pairs[a] == q, (q, a, pairs[a])


# --------------------------------------------------------------------------------------
# Errors and helpers
# --------------------------------------------------------------------------------------


def test_unknown_family_raises_usage_error():
    with pytest.raises(UsageError, match=r"unknown task family 'nope'.*thinwire tasks"):
        generate("nope", 3, seed=0)
    with pytest.raises(UsageError, match="unknown task family"):
        generate_suite(3, seed=0, families=["add", "nope"])
    with pytest.raises(UsageError):
        tasks.families_in("nope")


def test_bad_counts_raise_usage_error():
    with pytest.raises(UsageError):
        generate("add", -1, seed=0)
    with pytest.raises(UsageError):
        generate_suite(2, seed=0, families=["add", "add"])


def test_describe_lists_every_family():
    rows = tasks.describe()
    assert [r["name"] for r in rows] == list(FAMILIES)
    for r in rows:
        assert r["output"] == tasks.example(r["name"])["output"]
