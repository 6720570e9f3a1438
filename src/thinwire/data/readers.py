"""Readers for instruction data people already have; every reader yields the same example dicts.

An example is `{"instruction", "input", "output", "category", "task"}` (strings). Formats:
Alpaca JSON/JSONL, Dolly JSONL, Natural Instructions task files (one file or a directory of
them), and Hugging Face `datasets` (a directory written by `save_to_disk`, or a hub id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinwire.errors import UsageError

FORMATS = ("auto", "alpaca", "dolly", "natural-instructions", "hf")


@dataclass(frozen=True)
class FieldMap:
    """Which record field holds each part of an example ('' = absent)."""

    instruction: str
    input: str
    output: str
    category: str


DEFAULT_FIELDS = {
    "alpaca": FieldMap("instruction", "input", "output", "category"),
    "dolly": FieldMap("instruction", "context", "response", "category"),
    "hf": FieldMap("instruction", "input", "output", "category"),
}


def read_examples(source: str, fmt: str = "auto", fields: dict[str, str] | None = None) -> list[dict]:
    """Read `source` in format `fmt`; `fields` overrides the format's default field names."""
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt == "natural-instructions":
        return read_natural_instructions(source)
    mapping = DEFAULT_FIELDS[fmt]
    if fields:
        mapping = FieldMap(**{k: fields.get(k) or getattr(mapping, k) for k in mapping.__dataclass_fields__})
    if fmt == "hf":
        records = [(f"{source}: row {i}", row) for i, row in enumerate(_read_hf(source))]
    else:
        records = _read_json_records(Path(source))
    return [_to_example(rec, mapping, place) for place, rec in records]


def read_alpaca(path: str | Path) -> list[dict]:
    return read_examples(str(path), "alpaca")


def detect_format(source: str) -> str:
    """hf for a `save_to_disk` directory or a hub id; natural-instructions for task files; else
    dolly or alpaca by the first record's fields (a directory of .jsonl files: its first file's)."""
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf"
        if not _jsonl_files(path):
            return "natural-instructions"
    elif not path.exists():
        if source.count("/") == 1 and not source.startswith((".", "/", "~")):
            return "hf"
        raise UsageError(f"data file {source} does not exist; set data.source to an existing file")
    elif path.suffix != ".jsonl":
        document = _read_json(path)
        if isinstance(document, dict) or (isinstance(document, list) and document and isinstance(document[0], dict)
                                          and "Definition" in document[0]):
            return "natural-instructions"
    first = _read_json_records(path)[0][1]
    return "dolly" if "response" in first else "alpaca"


def _to_example(rec: dict, fields: FieldMap, place: str) -> dict:
    missing = [f for f in (fields.instruction, fields.output) if not isinstance(rec.get(f), str)]
    if missing:
        raise UsageError(f"{place} lacks string field(s) {', '.join(missing)}; "
                         "fix the data or map fields with data.instruction_field / data.output_field")
    category = str(rec.get(fields.category, "")) if fields.category else ""
    return {
        "instruction": rec[fields.instruction],
        "input": str(rec.get(fields.input) or "") if fields.input else "",
        "output": rec[fields.output],
        "category": category,
        "task": str(rec.get("task", category)),
    }


def read_natural_instructions(source: str) -> list[dict]:
    """Task files: `Definition` (the instruction), `Instances` (input, output list); task = file name."""
    path = Path(source)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"directory {source} holds no data files: *.jsonl (one record per line) or Natural "
                         "Instructions task files (*.json)")
    examples = []
    for file in files:
        task = _read_json(file)
        if not isinstance(task, dict) or "Definition" not in task or "Instances" not in task:
            raise UsageError(f"{file} is not a Natural Instructions task file: it needs Definition and Instances")
        definition = task["Definition"]
        instruction = " ".join(definition) if isinstance(definition, list) else str(definition)
        category = task.get("Categories", [""])
        category = category[0] if isinstance(category, list) and category else str(category or "")
        for i, inst in enumerate(task["Instances"]):
            outputs = inst.get("output") if isinstance(inst, dict) else None
            output = outputs[0] if isinstance(outputs, list) and outputs else outputs
            if not isinstance(inst, dict) or not isinstance(inst.get("input"), str) or not isinstance(output, str):
                raise UsageError(f"{file}: instance {i} needs a string input and an output")
            examples.append({"instruction": instruction, "input": inst["input"], "output": output,
                             "category": category, "task": file.stem})
    return examples


def _read_hf(source: str) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise UsageError("reading Hugging Face datasets needs the datasets package; pip install datasets") from exc
    try:
        if Path(source).is_dir():
            data = datasets.load_from_disk(source)
        else:
            data = datasets.load_dataset(source)
    except Exception as exc:  # datasets raises many types for a missing or unreachable dataset
        raise UsageError(f"cannot load dataset {source!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}; "
                         "pass a directory written by save_to_disk when the hub is unreachable") from exc
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else data[next(iter(data))]
    return [dict(row) for row in data]


def _jsonl_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


def _text(path: Path) -> str:
    """The file's text; non-UTF-8 bytes are a UsageError naming the line they are on."""
    if not path.is_file():
        raise UsageError(f"data file {path} does not exist; set data.source to an existing file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UsageError(f"data file {path} line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                         "save the file as UTF-8") from None
    if not text.strip():
        raise UsageError(f"data file {path} is empty; give it at least one record")
    return text


def _parse(text: str, path: Path, line: int | None = None) -> Any:
    """One JSON document (the whole file, or its line `line`); every way it can be malformed is a
    UsageError naming the file and the line."""
    where = f"data file {path}" + (f" line {line}" if line else "")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"data file {path} line {line or exc.lineno} is not valid JSON ({exc.msg} at column "
                         f"{exc.colno}); fix it") from None
    except RecursionError:
        raise UsageError(f"{where} nests arrays or objects too deeply to read; flatten it") from None
    except ValueError as exc:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise UsageError(f"{where} holds a number too long to read ({str(exc).split(':')[0]}); "
                         "shorten it or quote it as a string") from None


def _read_json(path: Path) -> Any:
    return _parse(_text(path), path)


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for every non-blank line of a JSON Lines file."""
    records = []
    for number, line in enumerate(_text(path).split("\n"), start=1):  # not splitlines: U+2028 is JSON text
        if line.strip():
            record = _parse(line, path, number)
            if not isinstance(record, dict):
                raise UsageError(f"data file {path} line {number} is a JSON {type(record).__name__}, not an "
                                 "object; give one JSON object per line")
            records.append((f"data file {path} line {number}", record))
    return records


def _read_json_records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for a .json list of objects, a .jsonl file, or a directory of .jsonl files
    (read in name order)."""
    if path.is_dir():
        files = _jsonl_files(path)
        if not files:
            raise UsageError(f"directory {path} holds no .jsonl files; put one JSON object per line in "
                             "*.jsonl files there, or set data.format")
        records = [record for file in files for record in _read_jsonl(file)]
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path)
    else:
        document = _read_json(path)
        if not isinstance(document, list) or not all(isinstance(r, dict) for r in document):
            raise UsageError(f"data file {path} must hold a list of JSON objects (or be a .jsonl file)")
        records = [(f"data file {path} record {i}", r) for i, r in enumerate(document)]
    if not records:
        raise UsageError(f"data file {path} holds no records; give it at least one")
    return records
