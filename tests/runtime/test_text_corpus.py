"""A DatasetBuild of format text on a corpus in S3 (a real SeaweedFS): its JSONL and Parquet parts
read a piece at a time from local copies, the documents kept streamed through a spill file, each
split written to S3 as JSONL and Parquet in row groups; a build stopped midway resumes from the
segments it saved in S3."""

import io
import json
import random

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmfactory.planner import parse, plan
from llmfactory_runtime.dataset import build, splits
from llmfactory_runtime.progress import Progress
from llmfactory_runtime.store import open_store
from llmfactory_runtime.task import InvalidTask

WORDS = ("river mountain forest desert island glacier volcano lake canyon reef meadow marsh rain wind snow "
         "stone sand wave tide cloud storm valley cliff delta").split()


def _document(i: int) -> str:
    """A document of its own words: far from every other one, for the near-duplicate filter too."""
    rng = random.Random(i)
    return f"Document {i}: " + " ".join(rng.choice(WORDS) for _ in range(40)) + "."


def _put(bucket: str, key: str, body: bytes) -> str:
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/{key}"


def test_a_corpus_in_s3_is_read_in_pieces_and_its_splits_written_back_in_row_groups(s3_bucket, monkeypatch):
    monkeypatch.setattr(splits, "PARQUET_ROWS", 4)  # several row groups from a few rows
    lines = [json.dumps({"text": _document(i), "url": f"https://example.org/{i}"}) for i in range(12)]
    lines += [lines[3], "{not json"]  # an exact duplicate, a malformed line
    jsonl = _put(s3_bucket, "corpus/part-0.jsonl", ("\n".join(lines) + "\n").encode())
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"text": _document(i), "id": i} for i in range(12, 24)]), buf,
                   row_group_size=5)  # read back batch by batch
    parquet = _put(s3_bucket, "corpus/part-1.parquet", buf.getvalue())
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": "corpus"},
           "spec": {"sources": [{"uri": jsonl, "language": "en"}, {"uri": parquet, "language": "en"}],
                    "format": "text", "split": {"validation": 0.25, "test": 0.25}}}
    task = plan(parse(doc), lambda *k: None, f"s3://{s3_bucket}/store")
    run = open_store(task["artifactUri"])
    result = build.run(task, run, Progress(run))

    assert result["dropped"] == {"duplicate_document": 1, "malformed": 1}
    assert result["rows"] == {"train": 12, "validation": 6, "test": 6} and result["rowsPerLanguage"] == {"en": 24}
    data = open_store(result["uri"])
    assert data.uri.startswith(f"s3://{s3_bucket}/store/") and data.is_committed()
    written = {}
    for name in ("train", "validation", "test"):
        written[name] = [json.loads(line) for line in data.read_bytes(f"{name}.jsonl").decode().splitlines()]
        table = pq.ParquetFile(io.BytesIO(data.read_bytes(f"{name}.parquet")))
        assert table.read().to_pylist() == written[name] and table.num_row_groups == -(-len(written[name]) // 4)
    assert sorted(r["text"] for rows in written.values() for r in rows) == sorted(_document(i) for i in range(24))

    doc["spec"]["sources"].append({"uri": f"s3://{s3_bucket}/corpus/part-2.jsonl"})
    task = plan(parse(doc), lambda *k: None, f"s3://{s3_bucket}/store")
    with pytest.raises(InvalidTask, match=rf"spec.sources\[2\].uri: there is no file at s3://{s3_bucket}/corpus/part-2"):
        build.run(task, open_store(task["artifactUri"]), Progress(open_store(task["artifactUri"])))


RUSSIAN = "река лес гора город зима сад музыка история рынок свет вода дорога".split()


class Stopped(BaseException):
    """The pod stopped (a preemption, an eviction, a lost node): nothing after it runs."""


def test_a_text_build_stopped_anywhere_resumes_from_its_saved_segments_to_the_same_dataset(s3_bucket, monkeypatch):
    """A text build saves what it decided every SEGMENT documents (in S3, with the run): stopped at a
    random document (3 trials), the next attempt reads the documents before its last saved segment
    again but classifies none of them, and writes the dataset an uninterrupted build writes; sources
    changed in between, it starts over; its saved segments are gone once the dataset is whole."""
    from llmfactory_runtime.dataset import corpus, dedupe, languages, pieces

    monkeypatch.setattr(corpus, "SEGMENT", 16)
    monkeypatch.setattr(pieces, "available", lambda: 1)
    monkeypatch.setattr(languages, "PIECE", 4)  # several pieces a segment
    monkeypatch.setattr(dedupe, "BULK", 4)
    rng = random.Random(3)
    texts = [_document(i) if i % 3 else " ".join(rng.choice(RUSSIAN) for _ in range(30)) + f" {i}." for i in range(70)]
    texts[20:20] = [texts[4], texts[10].replace("river", "stream", 1) if "river" in texts[10] else texts[10] + "!",
                    "short"]  # an exact and a near duplicate, one too short
    texts[1] = _document(232)  # its digest (the exact duplicate filter's) ends with a zero byte, saved whole
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    lines.insert(30, "{not json")
    first = _put(s3_bucket, "resume/part-0.jsonl", ("\n".join(lines[:50]) + "\n").encode())
    second = _put(s3_bucket, "resume/part-1.jsonl", ("\n".join(lines[50:]) + "\n").encode())
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": "resumed"},
           "spec": {"sources": [{"uri": first}, {"uri": second}], "format": "text",
                    "languageDetection": {"candidates": ["en", "ru"]}, "samplesPerLanguage": {"en": 40, "ru": 15},
                    "filters": {"minAnswerChars": 20, "nearDuplicateThreshold": 0.8},
                    "split": {"validation": 0.2, "test": 0.2}}}
    classified = []
    real_classified = languages.classified
    monkeypatch.setattr(languages, "classified", lambda c, t: classified.extend(t) or real_classified(c, t))

    def build_in(root: str) -> tuple[dict, object]:
        task = plan(parse(doc), lambda *k: None, f"s3://{s3_bucket}/{root}")
        run = open_store(task["artifactUri"])
        result = build.run(task, run, Progress(run))
        return {k: v for k, v in result.items() if k != "uri"}, run

    def saved_segments(root: str) -> int:
        task = plan(parse(doc), lambda *k: None, f"s3://{s3_bucket}/{root}")
        return len(open_store(task["artifactUri"]).list(corpus.STATE))

    whole, run = build_in("whole")
    assert whole["dropped"] == {"duplicate_document": 1, "near_duplicate_document": 1, "too_short": 1, "malformed": 1,
                                "over_language_count": 15}  # 46 en, 24 ru
    assert sum(whole["rows"].values()) == 55 and len(classified) == 72 and run.list(corpus.STATE) == []
    add = corpus.Spill.add
    for trial, stop_at in enumerate(random.Random(0).sample(range(2, 68), 3)):
        calls = []
        monkeypatch.setattr(corpus.Spill, "add", lambda self, d: calls.append(1) or (
            _stop() if len(calls) == stop_at else add(self, d)))
        with pytest.raises(Stopped):
            build_in(f"stopped-{trial}")
        monkeypatch.setattr(corpus.Spill, "add", add)
        saved = saved_segments(f"stopped-{trial}") * corpus.SEGMENT
        classified.clear()
        stages = []
        stage = Progress.stage
        monkeypatch.setattr(Progress, "stage", lambda self, name, **k: stages.append((name, k.get("total"))) or
                            stage(self, name, **k))
        resumed, run = build_in(f"stopped-{trial}")
        monkeypatch.setattr(Progress, "stage", stage)
        # What `kubectl get` shows meanwhile: how many documents it reads again, out of how many.
        assert (("reading again the documents read before a restart", saved) in stages) == (saved > 0)
        assert resumed == whole, f"stopped at the {stop_at}th document kept"
        # Classified again: only the documents read after the last saved segment (within the length bounds).
        assert len(classified) == sum(1 for t in texts[saved:] if len(t) >= 20), stop_at
        assert run.list(corpus.STATE) == []

    # Stopped, then a source changed: the saved segments no longer describe it, and the build starts over.
    calls = []
    monkeypatch.setattr(corpus.Spill, "add", lambda self, d: calls.append(1) or (_stop() if len(calls) == 40 else add(self, d)))
    with pytest.raises(Stopped):
        build_in("changed")
    monkeypatch.setattr(corpus.Spill, "add", add)
    assert saved_segments("changed") == 2
    _put(s3_bucket, "resume/part-0.jsonl", ("\n".join([json.dumps({"text": _document(100)})] + lines[1:50]) + "\n").encode())
    resumed, _ = build_in("changed")
    assert resumed == build_in("changed-whole")[0] and resumed["digest"] != whole["digest"]


def _stop():
    raise Stopped()
