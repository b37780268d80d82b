"""From kept rows to a dataset's files: sampling per language, the seeded train/validation/test
split, and each split written as JSONL (whose bytes the dataset's digest is of) and Parquet,
streamed through local files so that a split larger than memory can be written."""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from ..data import SPLITS, jsonl_line
from ..store import Store
from ..task import InvalidTask
from .sources import HELD_OUT_FIRST, Drops

# A Parquet row group: this many rows, or fewer as long as their JSON takes this many bytes (long
# conversations: a group is held in memory while it is written)
PARQUET_ROWS, PARQUET_BYTES = 8192, 64 * 2**20
# Columns written to Parquet as JSON text, as Hugging Face datasets keep them: a row's tools are free-form
# JSON schemas, which one Arrow type for all would give each tool every other's parameters (as nulls).
# So is any column whose values no one Arrow type holds (a field a number in one row, text in another).
JSON_COLUMNS = {"tools"}
JSON = {b"json": b"true"}  # such a column's field metadata


def sample_per_language(prompts: list[dict], counts: dict[str, int] | None, seed: int, drops: Drops,
                        shown: Callable[[dict], str] = lambda p: p["turns"][0]) -> list[dict]:
    """At most counts[lang] prompts of each listed language, sampled, and none of the others; a held-out
    source's prompts (a benchmark's test split) are not sampled, only kept in the listed languages, and
    do not count: the test set stays whole and the other prompts fill the counts. shown: a prompt's
    text, for the few dropped ones the report shows. A listed language no prompt is in is an invalid
    task: a source labelled "Russian" where the counts say ru would otherwise build without it."""
    if not counts:
        return prompts
    rng, kept = random.Random(seed), []
    by_lang: dict[str, list[dict]] = {}
    for p in prompts:
        if p.get("split") in HELD_OUT_FIRST and p["language"] in counts:
            kept.append(p)
        else:
            by_lang.setdefault(p["language"], []).append(p)
    found = Counter(p["language"] for p in prompts)
    missing = [lang for lang, n in counts.items() if n and not found[lang]]
    if missing:
        languages = ", ".join(f"{lang} ({n})" for lang, n in found.most_common()) or "none: no prompt was kept"
        raise InvalidTask(f"spec.samplesPerLanguage: no prompt in {', '.join(missing)}; the prompts' languages: "
                          f"{languages}. A source's language or languageField names them, or languageDetection "
                          "finds them")
    for lang, group in by_lang.items():
        take = min(len(group), counts.get(lang, 0))
        chosen = set(map(id, rng.sample(group, take)))
        kept += [p for p in group if id(p) in chosen]
        for p in group:
            if id(p) not in chosen:
                drops.add("language_not_requested" if lang not in counts else "over_language_count",
                          lambda p=p, lang=lang: f"[{lang}] {shown(p)}")
    return kept


def split_rows(rows: list[dict], split: dict) -> dict[str, list[dict]]:
    """Seeded shuffle, then test, validation and train cuts; rows of a source with a fixed split go
    there, besides. Prompts are unique, so no prompt appears in two splits; a non-zero share gets at
    least one row when there are enough. A row's `key` orders it before the shuffle (row_key)."""
    fixed = {name: sorted((r for r in rows if r.get("split") == name), key=lambda r: r["key"]) for name in SPLITS}
    cut = _shared_out([r for r in rows if not r.get("split")], split)
    return {name: cut[name] + fixed[name] for name in SPLITS}


def _shared_out(rows: list[dict], split: dict) -> dict[str, list[dict]]:
    rows = sorted(rows, key=lambda r: r["key"])
    random.Random(split.get("seed", 42)).shuffle(rows)
    n = len(rows)
    sizes = {}
    for name in ("test", "validation"):
        share = split.get(name, 0.1)
        sizes[name] = max(1, round(n * share)) if share > 0 and n >= 3 else round(n * share)
    cut_test, cut_val = sizes["test"], sizes["test"] + sizes["validation"]
    return {"test": rows[:cut_test], "validation": rows[cut_test:cut_val], "train": rows[cut_val:]}


def row_key(system: str | None, first: str) -> str:
    """The order of a row (a conversation's system message and opening prompt, a document's text)
    before the seeded shuffle: the same data and seed always give the same split."""
    return hashlib.sha256(json.dumps([system, first]).encode()).hexdigest()[:32]


def write_split(data: Store, name: str, rows: Iterable[dict[str, Any]], digest: Any, parquet: bool,
                schema: Any = None) -> int:
    """One split's rows as data's <name>.jsonl (and <name>.parquet), written to local files as they come
    and then uploaded; the digest takes the split's name and its JSONL bytes. Parquet's columns are
    `schema`'s, its rows written in groups as they come; without one, every field of every row (_columns,
    group by group), and the groups are read back from the JSONL file once it is written. Either way one
    group is held at a time, never the split. Returns the number of rows."""
    digest.update(name.encode() + b"\0")
    count, group, held, inferred = 0, [], 0, []
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, table = Path(tmp) / f"{name}.jsonl", Path(tmp) / f"{name}.parquet"
        writer = _ParquetGroups(table, schema) if parquet and schema is not None else None
        with jsonl.open("wb") as out:
            for row in rows:
                line = jsonl_line(row)
                out.write(line)
                digest.update(line)
                count += 1
                if parquet:
                    group.append(row)
                    held += len(line)
                if _full(group, held):
                    if writer is not None:
                        writer.write(group)
                    else:
                        inferred.append(_columns(group))
                    group, held = [], 0
        if parquet and writer is None:  # every group's columns known: the groups again, read from the JSONL
            inferred.append(_columns(group))
            writer, group, held = _ParquetGroups(table, _unified(inferred)), [], 0
            with jsonl.open("rb") as lines:
                for line in lines:
                    group.append(json.loads(line))
                    held += len(line)
                    if _full(group, held):
                        writer.write(group)
                        group, held = [], 0
        if writer is not None:
            writer.close(group)
        data.upload_file(jsonl, f"{name}.jsonl")
        if parquet:
            data.upload_file(table, f"{name}.parquet")
    return count


def _full(group: list[dict[str, Any]], held: int) -> bool:
    """Whether a row group (its rows' JSON: `held` bytes) is to be written."""
    return len(group) == PARQUET_ROWS or held >= PARQUET_BYTES


def _columns(rows: list[dict[str, Any]]) -> Any:
    """The Parquet columns of rows: every field any of them has, each of the type its values share, nested
    fields too (Arrow's Table.from_pylist would take the first row's fields alone), or JSON text."""
    import pyarrow as pa  # noqa: PLC0415

    return pa.schema([_field(name, lambda name=name: pa.array([row.get(name) for row in rows]).type)
                      for name in dict.fromkeys(k for row in rows for k in row)])


def _unified(groups: list[Any]) -> Any:
    """One schema for the groups' columns: each column's types promoted to one, or JSON text."""
    import pyarrow as pa  # noqa: PLC0415

    def promoted(name: str) -> Any:
        found = [schema.field(name) for schema in groups if name in schema.names]
        if any(f.metadata for f in found):  # JSON text in one group: in all
            return None
        return pa.unify_schemas([pa.schema([f]) for f in found], promote_options="permissive").field(0).type

    return pa.schema([_field(name, lambda name=name: promoted(name))
                      for name in dict.fromkeys(field.name for schema in groups for field in schema)])


def _field(name: str, type_of: Callable[[], Any]) -> Any:
    """A column of type_of()'s type, or of JSON text: a JSON_COLUMNS one, or where type_of finds no one
    type (None, or Arrow's refusal)."""
    import pyarrow as pa  # noqa: PLC0415

    try:
        typed = None if name in JSON_COLUMNS else type_of()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        typed = None
    return pa.field(name, pa.string(), metadata=JSON) if typed is None else pa.field(name, typed)


class _ParquetGroups:
    """A Parquet file written a row group at a time, its columns known before its rows."""

    def __init__(self, path: Path, schema: Any):
        import pyarrow.parquet as pq  # noqa: PLC0415

        self.schema, self.writer, self.groups = schema, pq.ParquetWriter(path, schema, compression="zstd"), 0
        self.json = [field.name for field in schema if field.metadata == JSON]

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa  # noqa: PLC0415

        if self.json:
            rows = [{**row, **{k: json.dumps(row[k], ensure_ascii=False) for k in self.json if row.get(k) is not None}}
                    for row in rows]
        self.writer.write_table(pa.Table.from_pylist(rows, self.schema))
        self.groups += 1

    def close(self, last: list[dict[str, Any]]) -> None:
        """The last rows written (an empty split: its one empty group), and the file closed."""
        if last or not self.groups:
            self.write(last)
        self.writer.close()
