"""Markdown tables for reports and benchmark pages."""
from __future__ import annotations

import numpy as np
import pandas as pd


def markdown_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    cols = list(df.columns)
    fmt = lambda v: (format(v, floatfmt) if isinstance(v, (float, np.floating)) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def md(header: list, rows: list) -> str:
    """A markdown table from a header and rows of already formatted cells."""
    return markdown_table(pd.DataFrame(rows, columns=header))
