"""Result rows on disk (CSV or JSON by suffix), written atomically and merged by settings."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .files import atomic_write_text
from .protocol import RESULT_FIELDS

FORMATS = (".csv", ".json")
METRICS = ("accuracy", "params", "macs", "prune_seconds", "dense_bytes", "peak_activation_bytes")


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"output file {path} must end in {' or '.join(FORMATS)}")
    return path


def row_key(row: dict) -> tuple:
    """Identity of a row: every non-empty field except the measured ones, as text (CSV rows are
    text); an empty field names the same row as a missing one, so new optional fields keep old rows."""
    return tuple(sorted((k, str(v)) for k, v in row.items() if k not in METRICS and v not in (None, "")))


def read_rows(path: str | Path) -> list[dict]:
    path = check_output_path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    if path.suffix.lower() == ".json":
        return json.loads(path.read_text())
    return list(csv.DictReader(io.StringIO(path.read_text())))


def merge_rows(existing: list[dict], new: list[dict], key=row_key) -> list[dict]:
    """Existing rows are kept; a new row replaces an existing one with the same settings."""
    merged = {key(row): row for row in existing}
    for row in new:
        merged[key(row)] = row
    return list(merged.values())


def write_rows(path: str | Path, rows: list[dict], key=row_key, first_fields=RESULT_FIELDS) -> None:
    """Merge `rows` into the file at `path` and replace it in one atomic rename.

    key(row) names a row (default: all but the measurements); first_fields lead the CSV columns.
    """
    path = check_output_path(path)
    rows = merge_rows(read_rows(path), rows, key)
    if path.suffix.lower() == ".json":
        atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
        return
    present = {k for row in rows for k in row}
    leading = [f for f in first_fields if f in present]
    fields = leading + sorted(present - set(leading))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
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
