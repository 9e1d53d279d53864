"""Result tables shared by the evaluation protocols (one row per encoder x task x metric, say).

The markdown formatter lives in `fm.tracking` (fm must not import evaluation), so tables printed
here and tables logged to MLflow look the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from fm.tracking import markdown_table


def results_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows of possibly different keys -> one DataFrame; columns in first-seen order, gaps as NaN."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return pd.DataFrame([dict(row) for row in rows], columns=list(columns))


def to_markdown(df: pd.DataFrame, float_format: str = "{:.4f}") -> str:
    return markdown_table(df, float_format=float_format)


def format_ci(point: float, low: float, high: float, digits: int = 3) -> str:
    """`0.912 [0.880, 0.941]`: a metric with its confidence interval, for tables meant to be read."""
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
