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


def _alpaca_lines(n):
    return [json.dumps({"instruction": f"Echo {i}", "input": "", "output": str(i)}) for i in range(n)]


@pytest.mark.parametrize("bad, words", [
    (b'{"instruction": "x", "output": "y",}', r"line 3 is not valid JSON \(Expecting property name"),
    (b'{"instruction": "caf\xe9", "output": "y"}', r"line 3 is not UTF-8 text \(byte 0xe9\)"),
    (b"[" * 100_000 + b"]" * 100_000, "line 3 nests arrays or objects too deeply"),
    (b'{"instruction": "x", "output": "y", "n": ' + b"7" * 5000 + b"}", "line 3 holds a number too long"),
    (b"[1, 2]", "line 3 is a JSON list, not an object"),
    (b'{"instruction": "x"}', "line 3 lacks string field"),
])
def test_malformed_jsonl_lines_are_named_by_their_line(tmp_path, bad, words):
    path = tmp_path / "d.jsonl"
    path.write_bytes("\n".join(_alpaca_lines(2)).encode() + b"\n" + bad + b"\n" + _alpaca_lines(1)[0].encode())
    with pytest.raises(UsageError, match=words) as caught:
        read_examples(str(path), "alpaca")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_json_file_names_the_line_of_its_syntax_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(UsageError, match=r"line 3 is not valid JSON"):
        read_examples(str(path))
    path.write_bytes(b'[{"instruction": "a", "output": "\xff"}]')
    with pytest.raises(UsageError, match="line 1 is not UTF-8"):
        read_examples(str(path))


def test_a_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a\u2028b", "output": "c"}, ensure_ascii=False) + "\n")
    assert read_examples(str(path))[0]["instruction"] == "a\u2028b"


def test_a_directory_of_jsonl_files_reads_them_in_name_order(tmp_path):
    _write_jsonl(tmp_path / "b.jsonl", [{"instruction": "second", "context": "", "response": "2"}])
    _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "first", "context": "x", "response": "1"}])
    (tmp_path / "notes.txt").write_text("not data")
    assert detect_format(str(tmp_path)) == "dolly"
    got = read_examples(str(tmp_path))
    assert [(e["instruction"], e["input"], e["output"]) for e in got] == [("first", "x", "1"), ("second", "", "2")]


def test_a_directory_without_data_files_says_what_it_needs(tmp_path):
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(UsageError, match=r"holds no data files: \*\.jsonl .* or Natural Instructions"):
        read_examples(str(tmp_path))
    with pytest.raises(UsageError, match=r"holds no \.jsonl files"):
        read_examples(str(tmp_path), "alpaca")


def test_a_malformed_data_file_is_one_line_through_the_cli(tmp_path, capsys):
    from thinwire.cli import main

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n\n{"instruction": "\x80"}\n')
    assert main(["run", "--set", f"data.source='{path}'", "--set", "model.name='tiny'",
                 "--out", str(tmp_path / "X")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 3 is not UTF-8" in err
    assert not (tmp_path / "X.partial").exists()


def _categorised(tmp_path, field):
    rows = [{"instruction": f"Echo {i}", "input": "", "output": str(i), **({field: f"kind{i % 3}"} if field else {})}
            for i in range(60)]
    return _write_jsonl(tmp_path / "own.jsonl", rows)


def test_by_task_on_a_file_splits_by_its_category_field(tmp_path, smoke_config):
    path = _categorised(tmp_path, "topic")
    fed = build_federation(smoke_config(f"data.source='{path}'", "data.partition='by-task'",
                                        "data.category_field='topic'"))
    assert [{e["category"] for e in c} for c in fed.clients] == [{"kind0"}, {"kind1"}, {"kind2"}]
    fed = build_federation(smoke_config(f"data.source='{path}'", "data.partition='dirichlet'",
                                        "data.category_field='topic'"))
    assert sum(map(len, fed.clients)) + len(fed.eval) == 60


def test_by_task_on_a_file_without_the_category_field_is_an_error(tmp_path, smoke_config):
    path = _categorised(tmp_path, None)
    with pytest.raises(UsageError, match=r"by-task' needs a task per record, but 48 of 48 training records .*"
                                         r"data.category_field = 'category'"):
        build_federation(smoke_config(f"data.source='{path}'", "data.partition='by-task'"))
    assert len(build_federation(smoke_config(f"data.source='{path}'", "data.partition='iid'")).clients) == 3
