"""Conversations in tables: parquet and CSV files, read with pyarrow (`pip install 'dialogen[data]'`).

A row is one conversation. Its column `messages` holds OpenAI-shaped messages (a list of
{role, content, weight?} structs in parquet, or that list as JSON text in CSV), or its column
`conversations` holds ShareGPT turns ({from, value}); an optional `system` column gives the
persona. The same checks as for JSON records apply (`records.parse_record`), and errors name
the file, the row (1 = the first row after a CSV's header) and the field.
"""

from __future__ import annotations

import io
from pathlib import Path

from ..errors import UserError
from ..textio import decode, load_json
from .records import KEYS, OPENAI, SHAREGPT, Parsed, read_records

COLUMNS = {KEYS[OPENAI]: OPENAI, KEYS[SHAREGPT]: SHAREGPT}


def _pyarrow(kind: str):
    try:
        import pyarrow  # noqa: F401 (an optional extra)
    except ImportError:
        raise UserError(f"reading {kind} files needs pyarrow: pip install 'dialogen[data]'") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_parquet(path: Path, skip_bad: bool = False) -> Parsed:
    _pyarrow("parquet")
    import pyarrow.parquet as pq

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if magic != b"PAR1":
        raise UserError(f"{path}: not a parquet file (it does not start with PAR1)")
    try:
        table = pq.read_table(path)
        rows = table.to_pylist()
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise UserError(f"{path}: not a readable parquet file ({_first_line(e)})") from None
    return _read_rows(path, table.column_names, rows, skip_bad, cells_are_json=False)


def read_csv(path: Path, skip_bad: bool = False) -> Parsed:
    _pyarrow("CSV")
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    decode(raw, str(path))  # not UTF-8: stop at file:line
    try:
        names = pacsv.open_csv(io.BytesIO(raw)).schema.names
        # every column as text: a messages cell is JSON, a persona is never read as a number
        options = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
        table = pacsv.read_csv(io.BytesIO(raw), convert_options=options)
    except Exception as e:  # pyarrow.lib.ArrowInvalid: rows of different widths, a broken quote, no rows
        raise UserError(f"{path}: not a readable CSV file ({_first_line(e)})") from None
    return _read_rows(path, table.column_names, table.to_pylist(), skip_bad, cells_are_json=True)


def _read_rows(path: Path, columns: list[str], rows: list[dict], skip_bad: bool, cells_are_json: bool) -> Parsed:
    key = next((c for c in COLUMNS if c in columns), None)
    if key is None:
        raise UserError(f"{path}: expected a 'messages' column (OpenAI's chat format: a list of {{role, content}}) "
                        f"or a 'conversations' column (ShareGPT: a list of {{from, value}}); the columns are: "
                        f"{', '.join(columns[:20]) or '(none)'}")

    def records():
        for n, row in enumerate(rows, 1):
            where = f"{path}: row {n}"
            try:
                yield where, _record(row, key, where, cells_are_json)
            except UserError as e:
                yield where, e

    return read_records(records(), skip_bad, COLUMNS[key])


def _record(row: dict, key: str, where: str, cells_are_json: bool) -> dict:
    cell = row.get(key)
    if isinstance(cell, str) and (cells_are_json or cell.lstrip().startswith("[")):
        cell = load_json(cell, f"{where}, column {key}") if cell.strip() else None
    if cell is None:
        raise UserError(f"{where}: the '{key}' cell is empty")
    if isinstance(cell, list):  # parquet structs give every field, null where a message has none
        cell = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in cell]
    record = {key: cell}
    system = row.get("system")
    if system not in (None, ""):
        record["system"] = system
    return record
