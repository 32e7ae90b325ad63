"""What commands print on stdout besides the serving commands' lines (`smalltalk.serve.format`):
result tables. Logs go to stderr, so stdout stays a result a script can read."""

from __future__ import annotations


def show_table(table, max_width: int = 200, **options) -> None:
    """A pyarrow table as DuckDB draws it."""
    import duckdb

    duckdb.from_arrow(table).show(max_width=max_width, **options)
