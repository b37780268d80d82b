"""A DatasetBuild of format text on a corpus in S3 (a real SeaweedFS): its JSONL and Parquet parts
read a piece at a time from local copies, the documents kept streamed through a spill file, each
split written to S3 as JSONL and Parquet in row groups."""

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
