import json

import numpy as np
import pytest

from thinwire.data import build_federation, partition
from thinwire.data.readers import read_alpaca
from thinwire.data.template import IGNORE_INDEX, encode_example
from thinwire.errors import UsageError
from thinwire.models.tiny import tiny_tokenizer


def test_prompt_tokens_are_masked():
    tok = tiny_tokenizer()
    ex = {"instruction": "Reverse the word.", "input": "abc", "output": "cba"}
    enc = encode_example(tok, ex, max_length=512)
    answer = [i for i, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(answer) == "cba" + tok.eos_token
    assert enc["labels"][: len(enc["labels"]) - len(answer)] == [IGNORE_INDEX] * (len(enc["labels"]) - len(answer))


def test_truncation_keeps_the_response():
    tok = tiny_tokenizer()
    enc = encode_example(tok, {"instruction": "x" * 500, "input": "", "output": "yes"}, max_length=64)
    assert len(enc["input_ids"]) == 64
    assert tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]) == "yes</s>"


def test_iid_partition_covers_everything_once():
    parts = partition.iid(10, 3, np.random.default_rng(0))
    assert sorted(sum(parts, [])) == list(range(10))
    assert [len(p) for p in parts] == [4, 3, 3]


def test_dirichlet_is_seeded_and_skewed():
    labels = ["a"] * 50 + ["b"] * 50
    one = partition.dirichlet(labels, 4, 0.1, np.random.default_rng(1))
    two = partition.dirichlet(labels, 4, 0.1, np.random.default_rng(1))
    assert one == two and sorted(sum(one, [])) == list(range(100)) and all(one)
    shares = [sum(1 for i in p if labels[i] == "a") / len(p) for p in one]
    assert max(shares) - min(shares) > 0.5


def test_dirichlet_reports_empty_clients():
    with pytest.raises(UsageError, match="left a client empty"):
        partition.dirichlet(["a", "b"], 5, 0.5, np.random.default_rng(0), attempts=3)


def test_by_task_gives_each_client_one_task():
    tasks = ["x"] * 4 + ["y"] * 4
    parts = partition.by_task(tasks, 4)
    assert [sorted({tasks[i] for i in p}) for p in parts] == [["x"], ["y"], ["x"], ["y"]]
    assert sorted(sum(parts, [])) == list(range(8))


def test_alpaca_reader_json_and_jsonl(tmp_path):
    rows = [{"instruction": "Add.", "input": "1 + 1", "output": "2"}, {"instruction": "Hi", "output": "Hello"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("d.json", "d.jsonl"):
        got = read_alpaca(tmp_path / name)
        assert [(e["instruction"], e["input"], e["output"]) for e in got] == [("Add.", "1 + 1", "2"), ("Hi", "", "Hello")]


@pytest.mark.parametrize("content, words", [
    ("", "is empty"), ("{nope", "not valid JSON"), ('[{"instruction": "x"}]', "lacks string field"),
    ('{"a": 1}', "list of JSON objects"),
])
def test_alpaca_reader_bad_files(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=words):
        read_alpaca(path)


def test_suite_federation_holds_out_unseen_examples(smoke_config):
    fed = build_federation(smoke_config())
    assert len(fed.clients) == 3 and all(fed.clients)
    assert [{e["task"] for e in c} for c in fed.clients] == [{"add"}, {"reverse-word"}, {"uppercase"}]
    seen = {(e["task"], e["input"]) for c in fed.clients for e in c}
    assert fed.eval and not any((e["task"], e["input"]) in seen for e in fed.eval)


def test_file_federation_and_missing_category(tmp_path, smoke_config):
    rows = [{"instruction": "Echo.", "input": str(i), "output": str(i)} for i in range(40)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    fed = build_federation(smoke_config(f"data.source='{path}'", "data.partition='iid'"))
    assert sum(map(len, fed.clients)) + len(fed.eval) == 40
    with pytest.raises(UsageError, match="category_field"):
        build_federation(smoke_config(f"data.source='{path}'", "data.partition='dirichlet'"))


@pytest.mark.parametrize("heldout", [[], ["swap-case"]])
def test_validation_split_is_disjoint_from_test_and_training(smoke_config, heldout):
    test = build_federation(smoke_config(f"data.heldout_tasks={heldout}"))
    val = build_federation(smoke_config(f"data.heldout_tasks={heldout}", "data.eval_split='validation'"))
    key = lambda rows: {(e["task"], e["input"]) for e in rows}  # noqa: E731
    assert test.clients == val.clients  # tuning trains on exactly what the reported run trains on
    trained = key(e for c in val.clients for e in c)
    assert len(val.eval) == len(test.eval) and not key(val.eval) & (key(test.eval) | trained)
    assert {e["task"] for e in val.eval} == {e["task"] for e in test.eval}
    assert len(val.heldout) == len(test.heldout) and not key(val.heldout) & key(test.heldout)


CHAT = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_template_masks_all_but_the_response_and_its_end_of_turn():
    from thinwire.data.template import encode_prompts, render_prompt, use_template

    tok = tiny_tokenizer()
    assert use_template(tok, "auto") == "alpaca"  # no chat template: auto falls back to Alpaca
    with pytest.raises(UsageError, match="has no chat template"):
        use_template(tok, "chat")
    tok.chat_template = CHAT
    assert use_template(tok, "auto") == "chat"
    example = {"instruction": "Uppercase the words.", "input": "tiger parrot", "output": "TIGER PARROT"}
    prompt = render_prompt(example, tok)
    assert prompt == f"<|user|>Uppercase the words.\n\ntiger parrot{tok.eos_token}<|assistant|>"
    enc = encode_example(tok, example, 256)
    response = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(response) == tok.decode(tok("TIGER PARROT" + tok.eos_token, add_special_tokens=False)["input_ids"])
    assert tok.decode(enc["input_ids"]) == tok.decode(tok(prompt + "TIGER PARROT" + tok.eos_token,
                                                          add_special_tokens=False)["input_ids"])
    batch = encode_prompts(tok, [example, {"instruction": "Add.", "input": "", "output": "3"}])
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()  # left-padded


def test_the_own_data_example_runs_end_to_end_from_any_directory(tmp_path, monkeypatch):
    """README, "Your own data": the shipped config and sample federate from another directory,
    one category per client, and training lowers the held-out loss."""
    from pathlib import Path

    from thinwire.cli import main
    from thinwire.config import EXAMPLES, load_config

    monkeypatch.chdir(tmp_path)
    config = load_config("own_data")
    assert Path(config.data.source) == (EXAMPLES / "own_data.jsonl").resolve()
    federation = build_federation(config)
    assert sorted(c[0]["category"] for c in federation.clients) == ["antonyms", "geography", "grammar"]
    assert all(len({e["category"] for e in c}) == 1 for c in federation.clients)
    assert len(federation.eval) == 9 and not {e["input"] for e in federation.eval} & {
        e["input"] for c in federation.clients for e in c}
    assert main(["run", "own_data", "--out", "run", "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_eval"]["loss"] < summary["base_eval"]["loss"]
    assert load_config(tmp_path / "run" / "config.toml") == config  # the run records where its data was


def test_a_data_path_relative_to_the_working_directory_wins(tmp_path, monkeypatch):
    from thinwire.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "own_data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert load_config("own_data").data.source == "own_data.jsonl"
    assert load_config("own_data", ["data.source='tasks'"]).data.source == "tasks"


def test_the_readme_names_every_field_the_readers_read():
    from pathlib import Path

    from thinwire.data.readers import DEFAULT_FIELDS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Your own data", 1)[1].split("\n### ", 1)[0]
    for fmt, fields in DEFAULT_FIELDS.items():
        assert f"| `{fmt}` |" in section
        assert all(f"`{name}`" in section for name in (fields.instruction, fields.input, fields.output))
    for key in ("data.source", "data.format", "data.category_field", "data.eval_examples", "by-task"):
        assert key in section
