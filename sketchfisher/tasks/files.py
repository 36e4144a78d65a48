"""Reading a task's samples from files: text lines, records (.jsonl, .json, .csv, .tsv, .parquet, .arrow) and
dataset folders, each read as what it is; and the content hash a store records of them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Union

from ..errors import InputError

Sample = Union[str, tuple[str, str]]  # a text, or a (prompt, completion) pair: the loss on the completion only

TEXT_SUFFIXES = (".txt", ".text", "")  # one sample per line
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")
TASK_SUFFIXES = (".txt", ".text", *RECORD_SUFFIXES)  # what a folder's files are read as (hidden entries skipped)


def read_task(path: str | Path, text_field: str = "text", prompt_field: str = "prompt",
              completion_field: str = "completion") -> list[Sample]:
    """Samples of a task: a text file (``.txt`` or no suffix: one sample per line), or records with a string
    ``text_field``, or with ``prompt_field`` and ``completion_field`` (a prompt/completion pair: the causal-LM
    loss is taken on the completion's tokens only): ``.jsonl`` (one JSON object per line), ``.json`` (an array
    of objects or of strings), ``.csv``/``.tsv`` (a header row names the fields), ``.parquet`` (pandas/pyarrow),
    ``.arrow`` (the ``datasets`` package). Suffixes are matched in any case; any other suffix is refused by name.
    A directory is a local dataset: one split written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict``
    folder is refused: give one split's folder), or a folder of task files read in name order, hidden files
    and folders (``.ipynb_checkpoints``) skipped."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"task file {path} does not exist")
    if path.is_dir():
        return _read_folder(path, text_field, prompt_field, completion_field)
    suffix = path.suffix.lower()
    fields = (text_field, prompt_field, completion_field)
    if suffix == ".parquet":
        return _records(path, _parquet_rows(path), *fields)
    if suffix == ".arrow":
        return _records(path, _dataset_rows(path), *fields)
    if suffix in (".csv", ".tsv"):
        return _records(path, _table_rows(path, "\t" if suffix == ".tsv" else ","), *fields)
    if suffix not in TEXT_SUFFIXES + (".jsonl", ".json"):
        raise InputError(f"task file {path}: unsupported type {path.suffix!r}; give one of "
                         f"{', '.join(TASK_SUFFIXES)} (or a text file without a suffix: one sample per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read task file {path}: {exc}") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: a .json task file holds an array of records or strings; found a "
                             f"{type(data).__name__} (one record per line is .jsonl)")
        rows = [(n, {text_field: r} if isinstance(r, str) else r) for n, r in enumerate(data, 1)]
        return _records(path, rows, *fields)
    lines = [line for line in text.splitlines() if line.strip()]
    if suffix != ".jsonl":
        return [line.strip() for line in lines]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append((n, json.loads(line)))
        except ValueError:
            raise InputError(f"{path}:{n}: not valid JSON") from None
    return _records(path, rows, *fields)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_folder(path: Path, text_field: str, prompt_field: str, completion_field: str) -> list[Sample]:
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one folder per split
        try:
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError):
            splits = []
        raise InputError(f"{path} holds a dataset with splits {splits or '(unreadable)'}; give one split's folder "
                         f"(e.g. {path / (splits[0] if splits else 'train')})")
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():  # Dataset.save_to_disk
        try:
            import datasets
        except ImportError:
            raise InputError(f"{path} was written by datasets' save_to_disk; reading it needs the 'datasets' "
                             "package (pip install datasets)") from None
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            raise InputError(f"{path} holds splits {sorted(data)}; give one split's folder")
        return _records(path, [(n, row) for n, row in enumerate(data, 1)], text_field, prompt_field, completion_field)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TASK_SUFFIXES
                   and not _hidden(p, path))
    if not files:
        raise InputError(f"{path} is a folder without task files ({', '.join(TASK_SUFFIXES)})")
    return [sample for f in files for sample in read_task(f, text_field, prompt_field, completion_field)]


def _table_rows(path: Path, sep: str) -> list[tuple[int, Any]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read task file {path}: {exc}") from None
    return [(n, row) for n, row in enumerate(frame.to_dict("records"), 2)]  # line numbers after the header


def _parquet_rows(path: Path) -> list[tuple[int, Any]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except ImportError:
        raise InputError(f"{path}: reading .parquet task files needs pyarrow (pip install pyarrow), or give a "
                         ".jsonl file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read task file {path}: {exc}") from None
    return [(n, row) for n, row in enumerate(frame.to_dict("records"), 1)]


def _dataset_rows(path: Path) -> list[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise InputError(f"{path}: reading .arrow task files needs the 'datasets' package "
                         "(pip install datasets), or give a .jsonl file") from None
    data = datasets.load_dataset("arrow", data_files=str(path), split="train")
    return [(n, row) for n, row in enumerate(data, 1)]


def _records(path: Path, rows: list[tuple[int, Any]], text_field: str, prompt_field: str,
             completion_field: str) -> list[Sample]:
    out: list[Sample] = []
    for n, record in rows:
        if isinstance(record, dict) and isinstance(record.get(prompt_field), str) \
                and isinstance(record.get(completion_field), str):
            out.append((record[prompt_field], record[completion_field]))
        elif isinstance(record, dict) and isinstance(record.get(text_field), str):
            out.append(record[text_field])
        else:
            raise InputError(f"{path}:{n}: each record needs a string field {text_field!r}, or the string fields "
                             f"{prompt_field!r} and {completion_field!r}")
    if not out:
        raise InputError(f"{path} holds no samples")
    return out


def file_sha256(path: str | Path) -> str:
    """Content hash of a task file, or of a folder's files with their relative names (hidden entries skipped, as
    :func:`read_task` skips them); stores record it, so later commands can tell the input is unchanged."""
    path = Path(path)
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)):
        digest.update(str(f.relative_to(path)).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()
