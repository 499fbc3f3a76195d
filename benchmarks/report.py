"""Printed tables and the JSON file of a run."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).parent / "results"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Prints rows as a right-aligned text table; missing cells print as '-'."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def clean(obj: Any) -> Any:
    """The payload with every non-finite float replaced by None, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def write_json(path: Path | str, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(payload), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)  # a reader, or an interrupted run, never sees half a file
    return path
