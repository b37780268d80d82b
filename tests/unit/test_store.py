"""The artifact store, file:// and s3:// (a real SeaweedFS server), behaves the same."""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmfactory_runtime import answer_cache
from llmfactory_runtime.answer_cache import AnswerCache
from llmfactory_runtime.store import finished_result, local_copy, open_store, write_result


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/prefix")


def test_bytes_and_json_round_trip(store):
    store.write_bytes("a/b.txt", b"one")
    store.write_bytes("a/b.txt", b"two")  # replaced whole
    store.write_json("a/c.json", {"x": "ф"})
    assert store.read_bytes("a/b.txt") == b"two"
    assert store.read_json("a/c.json") == {"x": "ф"}
    assert store.exists("a/b.txt") and not store.exists("a/missing")
    assert store.read_json_or_none("nothing.json") is None
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nothing")
    assert store.list("a") == ["b.txt", "c.json"]
    assert store.child("a").read_bytes("b.txt") == b"two"


def test_a_file_is_read_from_local_disk_where_it_lies_and_from_a_download_of_an_s3_object(store, tmp_path):
    """local_copy: what reads a source larger than memory in pieces (a DatasetBuild's corpus)."""
    store.write_bytes("corpus/part.jsonl", b'{"text": "one"}\n' * 1000)
    with local_copy(f"{store.uri}/corpus/part.jsonl") as path:
        assert path.read_bytes() == b'{"text": "one"}\n' * 1000 and path.name == "part.jsonl"
        local = store.local_path("corpus/part.jsonl") is not None
        assert (path == store.local_path("corpus/part.jsonl")) is local  # file://: no copy
    assert path.exists() is local  # a download is deleted after
    with pytest.raises(FileNotFoundError):
        with local_copy(f"{store.uri}/corpus/missing.jsonl"):
            pass
    with pytest.raises(FileNotFoundError):
        store.download_file("corpus/missing.jsonl", tmp_path / "missing.jsonl")


def test_a_split_read_empty_says_whether_its_file_is_there_and_which_are(store):
    """data.no_rows, what a FineTune, Benchmark or Quantization says of a split it found no rows in."""
    from llmfactory_runtime.data import no_rows, read_split

    store.write_bytes("data/train.jsonl", b'{"text": "one"}\n')
    store.write_bytes("data/test.jsonl", b"")
    assert read_split(f"{store.uri}/data", "validation") == read_split(f"{store.uri}/data", "test") == []
    assert no_rows(f"{store.uri}/data", "validation") == (f"{store.uri}/data has no validation rows (no "
                                                          "validation.jsonl there, only train.jsonl, test.jsonl)")
    assert no_rows(f"{store.uri}/data", "test", "pairs").endswith("has no test pairs (its test.jsonl is empty)")
    assert no_rows(store.uri, "train").endswith("(none of train.jsonl, validation.jsonl, test.jsonl there: name the "
                                                "dataset's folder)")


def test_a_split_line_that_is_not_a_json_row_is_refused_naming_the_file_and_line(store):
    """A hand-written or cut-off JSONL: refused as the user's to mend (exit 2, no retry), not a crash."""
    from llmfactory_runtime.data import read_split
    from llmfactory_runtime.task import InvalidTask

    store.write_bytes("data/train.jsonl", b'{"text": "one"}\n\n{"text": "tw')  # cut off
    with pytest.raises(InvalidTask, match=f"^{store.uri}/data/train.jsonl line 3: not JSON \\(Unterminated string"):
        read_split(f"{store.uri}/data", "train")
    store.write_bytes("data/train.jsonl", b'{"text": "one"}\n["two"]\n')
    with pytest.raises(InvalidTask, match="train.jsonl line 2: a row is a JSON object, got list"):
        read_split(f"{store.uri}/data", "train")


def test_result_counts_only_once_committed(store):
    run = store.child("ns/finetune/x/0123")
    assert finished_result(run) is None
    run.write_json("result.json", {"loss": 1})  # a run killed right here has no result
    assert finished_result(run) is None
    write_result(run, {"loss": 0.5})
    assert finished_result(run) == {"loss": 0.5}


def test_directories_upload_with_a_marker_and_partial_ones_are_refused(store, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"\0" * 3000)
    (src / "sub" / "t.json").write_text("{}")
    store.upload_dir(src, "model")
    assert store.read_json("model/COMMITTED")["files"] == {"w.bin": 3000, "sub/t.json": 2}
    out = store.download_dir("model", tmp_path / "copy")
    assert (out / "w.bin").read_bytes() == b"\0" * 3000 and (out / "sub" / "t.json").exists()

    store.upload_file(src / "w.bin", "partial/w.bin")  # an upload interrupted before its marker
    with pytest.raises(FileNotFoundError, match="not a committed directory"):
        store.download_dir("partial", tmp_path / "p")


def test_writers_of_the_same_file_at_once_leave_one_whole_copy(store, tmp_path):
    """Merging shards, two processes may write and upload the same files at the same moment."""
    from concurrent.futures import ThreadPoolExecutor
    sources = []
    for i in range(4):
        sources.append(tmp_path / f"v{i}")
        sources[-1].write_bytes(bytes([i]) * 200_000)

    def write(i: int) -> None:
        for _ in range(10):
            store.upload_file(sources[i % 4], "merged/train.jsonl")
            store.write_bytes("merged/result.json", bytes([i % 4]) * 50_000)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))  # raises if one writer's rename took another's file away
    assert store.read_bytes("merged/train.jsonl") in {src.read_bytes() for src in sources}
    assert len(set(store.read_bytes("merged/result.json"))) == 1
    assert store.list("merged") == ["result.json", "train.jsonl"]  # no temporary file left behind


def test_delete_prefix_removes_only_that_prefix(store):
    store.write_bytes("keep/a", b"1")
    store.write_bytes("drop/a", b"1")
    store.write_bytes("drop/b/c", b"1")
    store.delete_prefix("drop")
    assert store.list("drop") == [] and store.list("keep") == ["a"]


def test_an_answer_cache_folds_answers_into_packs_as_they_come_and_a_restart_reads_every_one(store, monkeypatch):
    """Every COMPACT_EVERY answers become one pack and their single objects go (a restart, after a
    kill that left no time to compact, reads a few packs, not an object an answer); answers put from
    many threads at once are each kept, in a pack or as a single, none deleted unpacked."""
    monkeypatch.setattr(answer_cache, "COMPACT_EVERY", 4)
    cache = AnswerCache.opened(store.uri, "teacher", {"model": "m"})
    for i in range(10):
        cache.put(f"k{i}", {"text": f"answer {i}"})
    folder = store.child(f"teacher/{answer_cache.digest({'model': 'm'})[:24]}")
    kinds = Counter(name.split("/")[0] for name in folder.list())
    assert kinds == {answer_cache.PACKS: 2, answer_cache.SINGLES: 2}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: cache.put(f"t{i}", {"text": f"answer {i}"}), range(100)))
    again = AnswerCache.opened(store.uri, "teacher", {"model": "m"})
    assert again.answers == cache.answers and len(again.answers) == 110
    assert sum(name.startswith(answer_cache.SINGLES) for name in folder.list()) < 4
    again.compact(minimum=1)
    assert not any(name.startswith(answer_cache.SINGLES) for name in folder.list())
    assert AnswerCache.opened(store.uri, "teacher", {"model": "m"}).answers == cache.answers


def test_a_grader_cache_that_writes_a_pack_a_step_folds_them_and_a_restart_reads_a_few(store, monkeypatch):
    """A GRPO run's grader writes a batch of scores as one pack every step (10,000 steps: 10,000 objects
    for the next start to read): every COMPACT_EVERY objects written, packs and single answers alike,
    become one pack, and what they held is all still there."""
    monkeypatch.setattr(answer_cache, "COMPACT_EVERY", 4)
    cache = AnswerCache.opened(store.uri, "grader", {"model": "rm"}, held=True)
    for step in range(9):
        cache.put_pack({f"s{step}-{i}": {"score": step + i / 10} for i in range(3)})
    cache.put("single", {"score": 0.5})
    folder = store.child(f"grader/{answer_cache.digest({'model': 'rm'})[:24]}")
    assert len(folder.list()) == 2 + 2  # two folds of 4, then a pack and a single
    AnswerCache.forget_held()
    again = AnswerCache.opened(store.uri, "grader", {"model": "rm"})
    assert again.answers == cache.answers and len(again.answers) == 9 * 3 + 1
    assert again.get("s8-2") == {"score": 8.2}


def test_s3_credentials_are_enforced(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(Exception, match="(?i)signature|denied|forbidden"):
        open_store(f"s3://{s3_bucket}/x").write_bytes("a", b"1")


def test_unknown_schemes_are_refused():
    with pytest.raises(ValueError, match="s3://bucket/prefix or file:///absolute/path"):
        open_store("gs://bucket/x")


def test_a_model_uri_that_names_nothing_loadable_is_refused_saying_what_is_there(store):
    """What a misspelt model URI or ggufFile gets before any loading: not a hub error about a file
    it looked for online; an S3 prefix with nothing under it is not cached as an empty model."""
    from llmfactory_runtime.models import locate
    from llmfactory_runtime.task import InvalidTask

    with pytest.raises(InvalidTask, match=f"model {store.uri}/models/later: .*(does not exist|there is nothing there)"):
        locate({"uri": f"{store.uri}/models/later"})
    store.write_bytes("models/later/config.json", b"{}")
    assert locate({"uri": f"{store.uri}/models/later"})[1] is None  # uploaded since: found
    store.write_bytes("models/m/model.Q8_0.gguf", b"GGUF")
    with pytest.raises(InvalidTask, match=r"ggufFile model.Q4_0.gguf is not there \(its GGUF files: model.Q8_0.gguf\)"):
        locate({"uri": f"{store.uri}/models/m", "ggufFile": "model.Q4_0.gguf"})
    with pytest.raises(InvalidTask, match=r"no config.json there \(its GGUF files: model.Q8_0.gguf: set ggufFile to one\)"):
        locate({"uri": f"{store.uri}/models/m"})
    assert locate({"uri": f"{store.uri}/models/m", "ggufFile": "model.Q8_0.gguf"})[1] == "model.Q8_0.gguf"
