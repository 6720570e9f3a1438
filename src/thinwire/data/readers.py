"""Readers for instruction data files people already have; every reader yields the same dicts.

An example is `{"instruction", "input", "output", "category", "task"}` (strings).
"""

from __future__ import annotations

import json
from pathlib import Path

from thinwire.errors import UsageError

ALPACA_FIELDS = ("instruction", "input", "output")


def read_alpaca(path: str | Path) -> list[dict]:
    """Alpaca JSON (a list of objects) or JSONL (one object per line)."""
    records = _read_json_records(Path(path))
    examples = []
    for i, rec in enumerate(records):
        missing = [f for f in ("instruction", "output") if not isinstance(rec.get(f), str)]
        if missing:
            raise UsageError(f"{path}: record {i} lacks string field(s) {', '.join(missing)}; "
                             "Alpaca records need instruction, input (optional) and output")
        examples.append({
            "instruction": rec["instruction"],
            "input": str(rec.get("input") or ""),
            "output": rec["output"],
            "category": str(rec.get("category", "")),
            "task": str(rec.get("task", rec.get("category", ""))),
        })
    return examples


def _read_json_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"data file {path} does not exist; set data.source to an existing file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UsageError(f"data file {path} is empty; give it at least one record")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"data file {path} is not valid JSON{'L' if path.suffix == '.jsonl' else ''}: "
                         f"{exc}") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UsageError(f"data file {path} must hold a list of JSON objects")
    return records
