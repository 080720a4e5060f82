"""Reading the user's and the bundled data: JSONL (.gz), Parquet and CSV files, folders written
by `datasets`' save_to_disk and data sets on the Hugging Face Hub, as rows of dicts, every
problem one `DataError` naming the source, row and field; the bundled data sets
(rlaif_ray/data/bundled, with PROVENANCE.md)."""
from __future__ import annotations

import gzip
import json
import zlib
from importlib import resources
from pathlib import Path


class DataError(ValueError):
    """Bad data: the message names the file, row and field."""


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("rlaif_ray.data") / "bundled" / name))


# One row of any data file (a post, a pair, an exemplar) may hold at most this many bytes,
# checked on the raw line before it is parsed or tokenized. 200 kB is ~50k tokens, several
# times the longest context a run here takes (vLLM caps max_model_len at 8192), so no usable
# prompt is refused; a row this long is a broken export, and tokenizing it costs seconds and
# GBs only to be skipped. A constant, not a config field, so that every reader of a file
# (preflight, the signal check, sft, train-rm, label) applies the same rule.
MAX_ROW_BYTES = 200_000
_GZIP_MAGIC, _PARQUET_MAGIC = b"\x1f\x8b", b"PAR1"


def file_kind(path: str | Path) -> str:
    """'parquet', 'csv', 'jsonl.gz' or 'jsonl', from the name (case-insensitive: .PARQUET, .JSONL.GZ)."""
    name = Path(path).name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    return "jsonl.gz" if name.endswith(".gz") else "jsonl"


HUB_PREFIX = "hf:"  # task.data_path "hf:ORG/NAME": a data set on the Hugging Face Hub


def read_rows(source: str, split: str = "train", revision: str | None = None) -> list[dict]:
    """Rows of any data source a task reads: a JSONL(.gz), Parquet or CSV file, a folder written
    by `datasets`' save_to_disk (a DatasetDict: its `split`), or `hf:ORG/NAME` on the Hub (its
    `split` at `revision`). Every problem is one DataError naming the source."""
    if source.startswith(HUB_PREFIX):
        return _read_hub(source[len(HUB_PREFIX):], split, revision)
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, split)
    return read_records(path)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading a Hugging Face data set needs the `datasets` package: pip install datasets") from None
    return datasets


def _table_rows(ds, where: str) -> list[dict]:
    rows = ds.to_list()
    for i, row in enumerate(rows, start=1):
        if (size := _check_row(row, Path(where), i)) > MAX_ROW_BYTES:
            raise _too_long(Path(where), i, f"{size:,}")
    return rows


def _read_saved_dataset(path: Path, split: str) -> list[dict]:
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(f"{path}: a folder, but not a data set written by `datasets` (no dataset_info.json or "
                        "dataset_dict.json): give a JSONL, Parquet or CSV file, or a save_to_disk folder")
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises several types for a damaged folder
        raise DataError(f"{path}: cannot read the saved data set ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (task.split); the data set has {', '.join(ds)}")
        ds = ds[split]
    return _table_rows(ds, str(path))


def _read_hub(name: str, split: str, revision: str | None) -> list[dict]:
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as e:  # noqa: BLE001 - offline, not found, no such split or revision
        raise DataError(f"{HUB_PREFIX}{name}: cannot load split {split!r}" + (f" at revision {revision}" if revision else "")
                        + f" from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return _table_rows(ds, f"{HUB_PREFIX}{name}")


def _text_bytes(value) -> int:
    """UTF-8 bytes of the text in a row; raises UnicodeEncodeError on a lone surrogate."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_bytes(v) for v in value)
    return 0


def _check_row(row: dict, path: Path, i: int) -> int:
    """Every text field encodable (JSON's \\ud800-style escapes can make a lone surrogate,
    which no tokenizer takes); returns the row's text bytes."""
    total = 0
    for key, value in row.items():
        try:
            total += _text_bytes(value)
        except UnicodeEncodeError as e:
            raise DataError(f"{path}: row {i} field {key!r} holds a lone surrogate ({e.object[e.start]!r}, "
                            "an unpaired \\ud800-\\udfff escape), which is not text: fix or remove the row") from None
    return total


def _too_long(path: Path, i: int, size: str) -> DataError:
    return DataError(f"{path}: row {i} is {size} bytes, over the limit of {MAX_ROW_BYTES:,} bytes per row "
                     "(rlaif_ray.data.files.MAX_ROW_BYTES; far longer than any prompt a model here takes): "
                     "remove or shorten the row")


def read_records(path: str | Path) -> list[dict]:
    """JSONL (optionally .gz) or Parquet rows as dicts; errors name file and row. The file
    type comes from the name, case-insensitively; a row over MAX_ROW_BYTES is refused by its
    byte length before it is parsed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    kind = file_kind(path)
    if kind == "parquet":
        return _read_parquet(path)
    if kind == "csv":
        return _read_csv(path)
    _check_compression(path, kind)
    return _read_jsonl(path, gzip.open if kind == "jsonl.gz" else open)


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(rows, start=1):
        if (size := _check_row(row, path, i)) > MAX_ROW_BYTES:
            raise _too_long(path, i, f"{size:,}")
    return rows


def _read_csv(path: Path) -> list[dict]:
    """A CSV file with a header row; every value is text (an empty cell is an empty string)."""
    import csv

    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == _GZIP_MAGIC or head == _PARQUET_MAGIC:
        raise DataError(f"{path}: binary data in a file named .csv (it starts with {head!r})")
    csv.field_size_limit(MAX_ROW_BYTES + 1)
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise DataError(f"{path}: empty, or no header row (the first row names the columns)")
            for i, row in enumerate(reader, start=1):
                if None in row:
                    raise DataError(f"{path}: row {i} has more cells than the header has columns")
                if (size := _check_row(row, path, i)) > MAX_ROW_BYTES:
                    raise _too_long(path, i, f"{size:,}")
                rows.append(row)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}): save it as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: not readable as CSV ({e})") from None
    return rows


def _check_compression(path: Path, kind: str) -> None:
    """The first bytes agree with the name: gzip data only in a .gz file, Parquet only in .parquet."""
    with open(path, "rb") as f:
        head = f.read(4)
    if kind == "jsonl.gz" and head[:2] != _GZIP_MAGIC:
        raise DataError(f"{path}: not a gzip file although named .gz (it starts with {head!r}): "
                        "compress it with gzip, or drop the .gz from its name")
    if kind == "jsonl" and head[:2] == _GZIP_MAGIC:
        raise DataError(f"{path}: gzip-compressed data in a file not named .gz: name it .jsonl.gz")
    if kind == "jsonl" and head == _PARQUET_MAGIC:
        raise DataError(f"{path}: a Parquet file not named .parquet: name it .parquet")


def _read_jsonl(path: Path, opener) -> list[dict]:
    """One JSON object per line; a line longer than MAX_ROW_BYTES is measured, never kept."""
    rows, i = [], 0
    try:
        with opener(path, "rb") as f:
            while raw := f.readline(MAX_ROW_BYTES + 1):
                i += 1
                if len(raw.rstrip(b"\r\n")) > MAX_ROW_BYTES:  # the rest of the line is counted, never kept
                    size = len(raw)
                    while not raw.endswith(b"\n") and (raw := f.readline(1 << 20)):
                        size += len(raw)
                    raise _too_long(path, i, f"{size:,}")
                if raw.strip():
                    rows.append(_json_row(raw, path, i))
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        if opener is not gzip.open:
            raise
        if isinstance(e, EOFError):
            raise DataError(f"{path}: the gzip file is truncated (it ends inside row {i + 1}, before the end of "
                            "the compressed stream): copy or compress it again") from None
        raise DataError(f"{path}: corrupt gzip data after row {i} ({e}): copy or compress it again") from None
    return rows


def _json_row(raw: bytes, path: Path, i: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: row {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: row {i} is not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}: row {i} must be a JSON object, got {type(row).__name__}")
    _check_row(row, path, i)
    return row
