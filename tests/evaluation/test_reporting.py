"""Result tables: rows with different keys merge into one table; markdown matches the tracking formatter."""

from __future__ import annotations

import math

from evaluation.reporting import format_ci, results_table, to_markdown


def test_results_table_merges_keys_in_first_seen_order():
    df = results_table([{"encoder": "vits", "auc": 0.9}, {"encoder": "vitb", "map": 0.8, "auc": 0.95}])
    assert list(df.columns) == ["encoder", "auc", "map"]
    assert math.isnan(df.loc[0, "map"]) and df.loc[1, "auc"] == 0.95
    assert to_markdown(df).splitlines() == [
        "| encoder | auc | map |",
        "| --- | ---: | ---: |",
        "| vits | 0.9000 |  |",
        "| vitb | 0.9500 | 0.8000 |",
    ]


def test_format_ci():
    assert format_ci(0.91234, 0.8801, 0.94109) == "0.912 [0.880, 0.941]"
