"""Result rows on disk (CSV or JSON by suffix), written atomically and merged by settings."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import fields
from pathlib import Path

from ..files import atomic_write_text, check_writable_file, file_lock
from .protocol import RESULT_FIELDS, Settings

FORMATS = (".csv", ".json")
METRICS = ("accuracy", "params", "macs", "prune_seconds", "dense_bytes", "peak_activation_bytes", "skipped_groups")


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"output file {path} must end in {' or '.join(FORMATS)}")
    return path


def known_fields() -> set[str]:
    """Every column a results row of this project can have (earlier versions wrote fewer)."""
    return set(RESULT_FIELDS) | {f.name for f in fields(Settings)} | set(METRICS)


def check_results_file(path: str | Path) -> Path:
    """Before any work: `path` can be written, and if it exists it is a results file of this project
    (rows are merged into it), never a foreign or corrupt file."""
    path = check_writable_file(check_output_path(path), "output file")
    if path.exists():
        rows = read_rows(path)
        foreign = sorted({key for row in rows for key in row} - known_fields())
        if foreign:
            raise ValueError(f"output file {path} is not a results file of this project (unknown column "
                             f"{foreign[0]!r}); choose another --output")
    return path


def row_key(row: dict) -> tuple:
    """Identity of a row: every non-empty field except the measured ones, as text (CSV rows are
    text); an empty field names the same row as a missing one, so new optional fields keep old rows."""
    return tuple(sorted((k, str(v)) for k, v in row.items() if k not in METRICS and v not in (None, "")))


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a CSV or JSON results file; a file that is not one raises ValueError naming it."""
    path = check_output_path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read results file {path}: {error}") from None
    if "\0" in text:
        raise ValueError(f"results file {path} is corrupt (NUL bytes)")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"results file {path} is not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"results file {path} must hold a JSON list of rows")
        return rows
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    if not reader.fieldnames or any(not name for name in reader.fieldnames) \
            or any(None in row or None in row.values() for row in rows):
        raise ValueError(f"results file {path} is corrupt (a row does not match the header)")
    return rows


def merge_rows(existing: list[dict], new: list[dict], key=row_key) -> list[dict]:
    """Existing rows are kept; a new row replaces an existing one with the same settings."""
    merged = {key(row): row for row in existing}
    for row in new:
        merged[key(row)] = row
    return list(merged.values())


def write_rows(path: str | Path, rows: list[dict], key=row_key, first_fields=RESULT_FIELDS) -> None:
    """Merge `rows` into the file at `path` and replace it in one atomic rename, under the file's
    lock (concurrent writers keep every row). key(row) names a row (default: all but the
    measurements); first_fields lead the CSV columns.
    """
    path = check_output_path(path)
    with file_lock(path):
        _write_merged(path, merge_rows(read_rows(path), rows, key), first_fields)


def _write_merged(path: Path, rows: list[dict], first_fields) -> None:
    if path.suffix.lower() == ".json":
        atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
        return
    present = {k for row in rows for k in row}
    leading = [f for f in first_fields if f in present]
    columns = leading + sorted(present - set(leading))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    atomic_write_text(path, buffer.getvalue())


def format_table(rows: list[dict], methods: list[str]) -> str:
    """Paper-style table: one line per group, one column per sparsity, cells 'default / intra_fusion'."""
    base = [r for r in rows if r["method"] == "base"]
    cells = {(str(r["group"]), float(r["sparsity"]), r["method"]): float(r["accuracy"])
             for r in rows if r["method"] != "base"}
    groups = list(dict.fromkeys(g for g, _, _ in cells))
    sparsities = sorted({s for _, s, _ in cells})
    width = max(12, 8 * len(methods))
    lines = []
    if base:
        lines.append(f"base accuracy: {float(base[0]['accuracy']):.2f}%")
    lines.append(f"cells: {' / '.join(methods)} (top-1 %)")
    lines.append("group  " + "".join(f"{'s=' + format(s, 'g'):>{width}}" for s in sparsities))
    for group in groups:
        parts = []
        for s in sparsities:
            values = [cells.get((group, s, m)) for m in methods]
            parts.append(" / ".join("-" if v is None else f"{v:.2f}" for v in values))
        lines.append(f"{group:<7}" + "".join(f"{p:>{width}}" for p in parts))
    return "\n".join(lines)
