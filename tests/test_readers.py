import json

import pytest

from thinwire.data import build_federation
from thinwire.data.readers import detect_format, read_examples
from thinwire.errors import UsageError


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_dolly_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Who?", "context": "Ada wrote code.", "response": "Ada", "category": "closed_qa"},
        {"instruction": "Name a fruit", "context": "", "response": "apple", "category": "brainstorming"},
    ])
    assert detect_format(str(path)) == "dolly"
    got = read_examples(str(path))
    assert got[0] == {"instruction": "Who?", "input": "Ada wrote code.", "output": "Ada",
                      "category": "closed_qa", "task": "closed_qa"}
    assert got[1]["input"] == ""


def test_natural_instructions_directory(tmp_path):
    task = {"Definition": ["Answer with the sum."], "Categories": ["Arithmetic"],
            "Positive Examples": [{"input": "1+1", "output": "2", "explanation": "sum"}],
            "Instances": [{"id": "a", "input": "2+2", "output": ["4"]}, {"id": "b", "input": "3+1", "output": ["4", "four"]}]}
    (tmp_path / "task001_sum.json").write_text(json.dumps(task))
    (tmp_path / "task002_sum.json").write_text(json.dumps(task))
    got = read_examples(str(tmp_path))
    assert len(got) == 4 and got[0]["instruction"] == "Answer with the sum."
    assert {e["task"] for e in got} == {"task001_sum", "task002_sum"}
    assert got[1]["output"] == "4" and got[1]["category"] == "Arithmetic"


def test_hf_saved_dataset_with_field_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"question": ["q1", "q2"], "answer": ["a1", "a2"], "topic": ["x", "y"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    got = read_examples(str(tmp_path / "ds"), "auto",
                        {"instruction": "question", "input": "", "output": "answer", "category": "topic"})
    assert [(e["instruction"], e["output"], e["category"]) for e in got] == [("q1", "a1", "x"), ("q2", "a2", "y")]
    with pytest.raises(UsageError, match="lacks string field"):
        read_examples(str(tmp_path / "ds"), "hf")


@pytest.mark.parametrize("rows, words", [
    ([{"instruction": "x", "context": "", "category": "c"}], "lacks string field"),
    ([], "holds no records"),
])
def test_bad_records(tmp_path, rows, words):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(UsageError, match=words):
        read_examples(str(path), "dolly")


def test_missing_source_and_unreachable_hub():
    with pytest.raises(UsageError, match="does not exist"):
        read_examples("./nowhere.jsonl")


def test_heldout_tasks_never_reach_clients(smoke_config):
    fed = build_federation(smoke_config("data.tasks=['add', 'uppercase', 'reverse-word']",
                                        "data.heldout_tasks=['reverse-word']"))
    assert {e["task"] for c in fed.clients for e in c} == {"add", "uppercase"}
    assert {e["task"] for e in fed.heldout} == {"reverse-word"}
    assert set(fed.eval_splits()) == {"", "heldout_"}
    with pytest.raises(UsageError, match="unknown task family"):
        build_federation(smoke_config("data.heldout_tasks=['nope']"))


def test_quantity_skew_varies_sizes(smoke_config):
    sizes = [len(c) for c in build_federation(smoke_config("data.partition='iid'", "data.quantity_skew=1.5",
                                                           "federation.clients=3")).clients]
    equal = [len(c) for c in build_federation(smoke_config("data.partition='iid'")).clients]
    assert max(sizes) == max(equal) and min(sizes) < max(sizes) and all(s >= 1 for s in sizes)
