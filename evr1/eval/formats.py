"""Reading benchmark annotation files as published: JSON, JSONL, parquet, CSV/TSV, text.

Benchmarks publish their questions in whatever format their authors chose. ``read_records``
turns a file (or a folder of files) into plain dicts; ``Record`` reads fields out of one of
them under the names a benchmark is known to use, and a missing field is a ``FormatError``
that names the file, the record, the fields it looked for and the fields that are there: the
user learns at ``--prepare`` time, on a login node, that a file is not what its benchmark
loader expects, instead of getting zero scores from a job array.
"""

from __future__ import annotations

import csv
import json
import os
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LETTERS = string.ascii_uppercase
TABLE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt")

# A published layout: globs relative to the folder a user downloaded; the files of the first
# group that matches anything are read. ``Layouts`` lists the groups in order of preference.
Layouts = Sequence[Sequence[str]]
TABLES_HERE: tuple[str, ...] = ("*.json", "*.jsonl", "*.parquet", "*.csv", "*.tsv")
# Where Hugging Face puts a dataset's files: <config>/<split>-00000-of-00003.parquet (or
# data/<split>-...), and <config>/<split>/0000.parquet on its refs/convert/parquet branch.
_HUB_SHARD = re.compile(r"^[A-Za-z0-9_.]+-\d{5}-of-\d{5}\.parquet$")
_CONVERTED_SHARD = re.compile(r"^\d{4}\.parquet$")


class FormatError(ValueError):
    """An annotation file does not have the fields its benchmark's loader expects."""


# --------------------------------------------------------------------------- files


def read_records(path: Path, suffixes: Sequence[str] = TABLE_SUFFIXES) -> list[dict[str, Any]]:
    """Every record of a file, or of every matching file in a folder (sorted by name).

    Each record gets ``_file`` (the file it came from) and ``_row`` (its index there), so
    loaders can derive sub-tasks from file names (MVBench, MLVU) and errors can say where.
    A JSON file holding a mapping of records (keyed by id) yields the values with ``_key``.
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes
                       and not p.name.startswith("."))
        if not files:
            raise FormatError(f"{path}: no annotation files ({', '.join(suffixes)}) in this "
                              "folder")
        return [r for f in files for r in read_records(f, suffixes)]
    if not path.is_file():
        raise FormatError(f"annotation file {path} does not exist")
    suffix = path.suffix.lower()
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet,
               ".csv": _read_csv, ".tsv": _read_csv}
    if suffix not in readers:
        raise FormatError(f"{path}: unsupported annotation format {suffix!r}; expected one of "
                          f"{', '.join(s for s in suffixes if s in readers)}")
    rows = readers[suffix](path)
    for i, row in enumerate(rows):
        row.setdefault("_file", str(path))
        row.setdefault("_row", i)
    return rows


def find_annotation_files(path: Path, layouts: Layouts) -> list[Path]:
    """The annotation files of ``path``: itself if a file, else those of the first layout
    group (globs relative to the folder) that matches, sorted. Hidden files are left out."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FormatError(f"annotation file {path} does not exist")
    for group in layouts:
        files = sorted({p for pattern in group for p in path.glob(pattern)
                        if p.is_file() and not p.name.startswith(".")})
        if files:
            return files
    here = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                  if not p.name.startswith("."))
    wanted = " | ".join(", ".join(group) for group in layouts)
    listing = ", ".join(here[:12]) + (" ..." if len(here) > 12 else "")
    raise FormatError(f"{path}: no annotation files in any published layout of this benchmark "
                      f"(looked for {wanted}); the folder holds: {listing or 'nothing'}")


def config_name(file: Path) -> str:
    """What a file's records belong to (a task, a track): the config folder of a Hugging Face
    shard (``multi-choice/test-00000-of-00001.parquet``, ``Perception/test/0000.parquet``),
    else the file's stem (``multi-choice.json``)."""
    if _HUB_SHARD.match(file.name):
        return file.parent.name
    if _CONVERTED_SHARD.match(file.name):
        return file.parent.parent.name
    return file.stem


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not readable JSON: {exc}") from exc
    if isinstance(data, list):
        return [_as_record(item, path, i) for i, item in enumerate(data)]
    if isinstance(data, dict):
        # Some benchmarks wrap the list ({"data": [...]}); others key records by id.
        lists = [v for v in data.values() if isinstance(v, list) and v
                 and all(isinstance(x, dict) for x in v)]
        if len(data) == 1 and lists:
            return [_as_record(item, path, i) for i, item in enumerate(lists[0])]
        if all(isinstance(v, dict) for v in data.values()):
            return [{**v, "_key": k} for k, v in data.items()]
    raise FormatError(f"{path}: expected a JSON list of records or a mapping id -> record, "
                      f"got {type(data).__name__}")


def _as_record(item: Any, path: Path, index: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise FormatError(f"{path}: record {index} is a {type(item).__name__}, not an object")
    return dict(item)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FormatError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
            rows.append(_as_record(item, path, number))
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        # heavy import, only for parquet annotation files
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise FormatError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise FormatError(f"{path}: not a readable parquet file: {exc}") from exc
    return [_plain(row) for row in table.to_pylist()]


def _plain(value: Any) -> Any:
    """Parquet rows may hold numpy scalars or bytes; records must be JSON-able."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (bytes, str)):
        return _plain(value.tolist())  # numpy arrays and scalars
    return value


def _read_csv(path: Path) -> list[dict[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(1 << 30)  # VLMEvalKit TSVs hold base64 images in one field
    with open(path, encoding="utf-8", newline="") as f:
        return [dict(row) for row in csv.DictReader(f, delimiter=delimiter)]


# --------------------------------------------------------------------------- records


@dataclass
class Record:
    """One annotation record and the benchmark it is read for (for error messages)."""

    raw: dict[str, Any]
    benchmark: str

    @property
    def where(self) -> str:
        return f"{self.raw.get('_file', '?')}: record {self.raw.get('_row', '?')}"

    def get(self, *names: str, default: Any = ...) -> Any:
        """The first of ``names`` present (and not null); without a default, a FormatError."""
        for name in names:
            value = self.raw.get(name)
            if value is not None and value != "":
                return value
        if default is not ...:
            return default
        present = ", ".join(sorted(k for k in self.raw if not k.startswith("_"))) or "none"
        raise FormatError(f"{self.where}: {self.benchmark}: no field {' / '.join(names)} "
                          f"(fields present: {present}); see docs/eval_benchmarks.md for the "
                          "format this loader reads")

    def text(self, *names: str, default: Any = ...) -> str:
        value = self.get(*names, default=default)
        return value if isinstance(value, str) else str(value) if value is not None else ""

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.where}: {self.benchmark}: {what}")


# --------------------------------------------------------------------------- options


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):：]\s*(.*\S)\s*$")
_LABELLED_LINE = re.compile(r"^\s*(?:Caption|Sentence|Option)\s+([A-Z])\s*[.:)]\s*(.*\S)\s*$",
                            re.IGNORECASE)


def lettered(texts: Sequence[str]) -> list[str]:
    """Options as "A. text" strings (a letter already in front is kept as is)."""
    out = []
    for i, text in enumerate(texts):
        text = str(text).strip()
        m = _OPTION_LINE.match(text)
        out.append(f"{m.group(1)}. {m.group(2)}" if m else f"{LETTERS[i]}. {text}")
    return out


def options_from_mapping(value: Any) -> list[str] | None:
    """``{"A": "red", "B": "blue"}`` -> ["A. red", "B. blue"] (in letter order)."""
    if not isinstance(value, dict):
        return None
    keys = sorted(k for k in value if isinstance(k, str) and len(k.strip()) == 1)
    return [f"{k.strip().upper()}. {str(value[k]).strip()}" for k in keys] or None


def as_options(value: Any) -> list[str] | None:
    """Options given as a list, a letter mapping, or a JSON string of either."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, dict):
        return options_from_mapping(value)
    if isinstance(value, (list, tuple)) and value:
        return lettered([str(v) for v in value])
    return None


def split_inline_options(text: str) -> tuple[str, list[str]]:
    """A question whose options are lines of its own text ("...?\\n(A) x\\n(B) y")."""
    lines = text.splitlines()
    stem, options = [], []
    for line in lines:
        m = _OPTION_LINE.match(line) or _LABELLED_LINE.match(line)
        expected = LETTERS[len(options)] if len(options) < len(LETTERS) else ""
        if m and m.group(1) == expected:
            options.append(f"{m.group(1)}. {m.group(2)}")
        elif not options:
            stem.append(line)
        else:  # a wrapped option line: glue it to the previous option
            options[-1] = f"{options[-1]} {line.strip()}"
    stem_text = "\n".join(stem).strip()
    if stem_text.lower().endswith("options:"):
        stem_text = stem_text[:-len("options:")].rstrip()
    return stem_text, options


_ANSWER_TAG = re.compile(r"</?answer>", re.IGNORECASE)


def strip_tags(value: Any) -> Any:
    """A reference answer without ``<answer>`` tags (converted layouts keep them)."""
    return _ANSWER_TAG.sub("", value).strip() if isinstance(value, str) else value


def letter_of(answer: Any, options: Sequence[str]) -> str | None:
    """The letter an answer names: "B", "(B)", "B. red", an index, or an option's text."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return LETTERS[answer] if 0 <= answer < len(options) else None
    text = str(answer).strip()
    m = re.match(r"^\(?([A-Z])(?:[.):：]|\s*$)", text)
    if m and LETTERS.index(m.group(1)) < max(len(options), 1):
        return m.group(1)
    labelled = _LABELLED_LINE.match(text)
    if labelled:
        return labelled.group(1).upper()
    bare = [re.sub(r"^\(?[A-Z][.):：]\s*", "", o).strip().lower() for o in options]
    if text.lower() in bare:
        return LETTERS[bare.index(text.lower())]
    return None


# --------------------------------------------------------------------------- media


@dataclass
class MediaResolver:
    """Finds a media file among candidate relative paths under a benchmark's video root.

    Published layouts differ between mirrors (``videos/x.mp4`` vs ``x.mp4``, ``.mp4`` vs
    ``.mkv``). The first candidate that exists wins; when none does, the first one is used and
    counted, so preprocessing records it as a failure (counted in the results, not dropped).
    """

    root: Path
    missing: int = 0
    checked: int = 0
    _cache: dict[tuple[str, ...], str] = field(default_factory=dict)
    _by_name: dict[str, list[Path]] | None = None

    def find(self, *candidates: str, search: Sequence[str] = ()) -> str:
        """The first candidate that exists; else, for a release that sorts its media into
        folders the annotation does not name (Video-MMMU's subject folders), the one file
        under the root named like one of ``search`` (only when exactly one matches)."""
        key = tuple(c for c in candidates if c)
        if not key:
            raise FormatError("no media path candidates")
        cache_key = (*key, "\0", *search)
        if cache_key in self._cache:
            return self._cache[cache_key]
        self.checked += 1
        paths = [Path(c) if os.path.isabs(c) else self.root / c for c in key]
        found = next((p for p in paths if p.is_file()), None)
        if found is None and search:
            found = self._unique_by_name(search)
        if found is None:
            self.missing += 1
            found = paths[0]
        self._cache[cache_key] = str(found)
        return str(found)

    def _unique_by_name(self, names: Sequence[str]) -> Path | None:
        if self._by_name is None:  # one walk of the root, on the first search
            self._by_name = {}
            if self.root.is_dir():
                for folder, _, files in os.walk(self.root):
                    for name in files:
                        self._by_name.setdefault(name, []).append(Path(folder) / name)
        for name in names:
            hits = self._by_name.get(name, [])
            if len(hits) == 1:
                return hits[0]
        return None


def with_suffixes(stem: str, suffixes: Sequence[str] = (".mp4", ".MP4", ".mkv", ".webm",
                                                         ".avi", ".mov")) -> list[str]:
    """``stem`` if it has a video suffix, else ``stem + s`` for each suffix."""
    if Path(stem).suffix.lower() in {s.lower() for s in suffixes}:
        return [stem]
    return [stem + s for s in suffixes]


def under(prefixes: Sequence[str], names: Sequence[str]) -> list[str]:
    """Every ``prefix/name`` pair, prefixes first (``""`` means the root itself)."""
    return [os.path.join(p, n) if p else n for p in prefixes for n in names]


def iter_nonempty(values: Any) -> Iterator[Any]:
    for value in values or ():
        if value is not None and value != "":
            yield value
