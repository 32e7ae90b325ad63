"""Report tables: Parquet tables rendered as one self-contained HTML fragment."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from smalltalk.files import write_bytes_atomically
from smalltalk.report.columns import PathLike

_CSS = """
.smalltalk-tables { font-family: "DejaVu Sans", Verdana, sans-serif; font-size: 13px; }
.smalltalk-tables h3 { font-size: 14px; margin: 18px 0 6px; }
.smalltalk-tables table { border-collapse: collapse; margin-bottom: 12px; }
.smalltalk-tables th, .smalltalk-tables td { padding: 3px 10px; border-bottom: 1px solid #ddd; }
.smalltalk-tables th { background: #f2f2f2; text-align: left; border-bottom: 2px solid #999; }
.smalltalk-tables td.num { text-align: right; font-variant-numeric: tabular-nums; }
.smalltalk-tables tr:hover td { background: #f8f8f8; }
"""


def format_value(value) -> str:
    """A table cell: integers with thousands separators, floats to four significant digits
    (scientific beyond a million or below a thousandth), missing values as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2014"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isinf(value):
            return "\u221e" if value > 0 else "\u2212\u221e"
        if value == 0:
            return "0"
        if abs(value) >= 1e6 or abs(value) < 1e-3:
            return f"{value:.3e}"
        if value == round(value) and abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def tables_html(tables: Mapping[str, PathLike], out: PathLike) -> Path:
    """Render Parquet tables, {title: path}, as one self-contained HTML fragment: a heading and a
    plain <table> each, CSS scoped to the fragment, numbers formatted by `format_value`."""
    parts = [f'<div class="smalltalk-tables">\n<style>{_CSS}</style>']
    for title, path in tables.items():
        table = pq.read_table(path)
        numeric = [
            t.startswith(("int", "uint", "float", "double", "decimal"))
            for t in map(str, table.schema.types)
        ]
        parts.append(f"<h3>{html.escape(str(title))}</h3>")
        parts.append("<table>")
        parts.append(
            "<tr>"
            + "".join(f"<th>{html.escape(name)}</th>" for name in table.column_names)
            + "</tr>"
        )
        for row in table.to_pylist():
            cells = (
                f'<td class="num">{html.escape(format_value(value))}</td>'
                if is_number
                else f"<td>{html.escape(format_value(value))}</td>"
                for value, is_number in zip(row.values(), numeric, strict=True)
            )
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("</div>\n")
    text = "\n".join(parts)
    # ASCII with character references: the fragment needs no charset declaration.
    return write_bytes_atomically(text.encode("ascii", "xmlcharrefreplace"), out)
