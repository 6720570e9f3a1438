"""Readers for instruction data people already have; every reader yields the same example dicts.

An example is `{"instruction", "input", "output", "category", "task"}` (strings). Formats:
Alpaca JSON/JSONL, Dolly JSONL, Natural Instructions task files (one file or a directory of
them), and Hugging Face `datasets` (a directory written by `save_to_disk`, or a hub id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
    records = _read_hf(source) if fmt == "hf" else _read_json_records(Path(source))
    return [_to_example(rec, mapping, source, i) for i, rec in enumerate(records)]


def read_alpaca(path: str | Path) -> list[dict]:
    return read_examples(str(path), "alpaca")


def detect_format(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf"
        return "natural-instructions"
    if not path.exists():
        if source.count("/") == 1 and not source.startswith((".", "/", "~")):
            return "hf"
        raise UsageError(f"data file {source} does not exist; set data.source to an existing file")
    records = _read_json_records(path)
    if isinstance(records, dict) or (records and "Definition" in records[0]):
        return "natural-instructions"
    if records and "response" in records[0]:
        return "dolly"
    return "alpaca"


def _to_example(rec: dict, fields: FieldMap, source: str, i: int) -> dict:
    missing = [f for f in (fields.instruction, fields.output) if not isinstance(rec.get(f), str)]
    if missing:
        raise UsageError(f"{source}: record {i} lacks string field(s) {', '.join(missing)}; "
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
        raise UsageError(f"{source} holds no Natural Instructions task files (*.json)")
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


def _read_json(path: Path):
    if not path.is_file():
        raise UsageError(f"data file {path} does not exist; set data.source to an existing file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UsageError(f"data file {path} is empty; give it at least one record")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"data file {path} is not valid JSON{'L' if path.suffix == '.jsonl' else ''}: "
                         f"{exc}") from exc


def _read_json_records(path: Path) -> list[dict] | dict:
    records = _read_json(path)
    if isinstance(records, dict) and "Definition" in records:
        return records
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UsageError(f"data file {path} must hold a list of JSON objects")
    if not records:
        raise UsageError(f"data file {path} holds no records; give it at least one")
    return records
