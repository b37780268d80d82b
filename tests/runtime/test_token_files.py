"""An sft split tokenized once a node into files its processes map (finetune/token_files.py): the
same examples as encoded in memory, written by one process while the others wait, never read half
written, reused by a restarted container, gone when the run ends."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from llmfactory_runtime import cpus
from llmfactory_runtime.batching import encode_rows, encode_text
from llmfactory_runtime.chat import IGNORE, encode_for_training
from llmfactory_runtime.data import dumps_jsonl, read_split
from llmfactory_runtime.finetune import encoding, token_files
from llmfactory_runtime.finetune.distributed import World
from llmfactory_runtime.dataset.pieces import Workers
from llmfactory_runtime.task import InvalidTask

from finetune_helpers import conversations, cut_and_left_out

SEA = "The sea is wide and the waves are blue. Sunlight is scattered by the air, blue light the most. "
ALONE = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))


MAX_LEN = 32  # some conversations fit, some are cut, some answers start past it


def _spec(max_len: int, loss_on: str = "assistant") -> dict:
    return {"objective": "sft", "hyperparameters": {"maxSeqLength": max_len, "lossOn": loss_on}}


def _rows() -> list[dict]:
    texts = [{"text": SEA * (1 + i % 4)} for i in range(300)]  # more than batching.ROWS_AT_ONCE
    return [row for pair in zip(texts, conversations(300)) for row in pair]


def _dataset(tmp_path, rows: list[dict]) -> str:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_bytes(dumps_jsonl(rows))
    return f"file://{folder}"


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_the_files_hold_the_examples_encoding_makes_in_memory_in_order(tiny_model, tmp_path, loss_on):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows, spec = _rows(), _spec(MAX_LEN, loss_on)
    with contextlib.ExitStack() as running:
        split = encoding.read(spec, tok, _dataset(tmp_path, rows), "train", ALONE, str(tmp_path), running)
        expected = encoding.encode(spec, tok, rows, "train")
        assert split.rows == len(rows) and split.lengths == expected.lengths and split.units > len(rows)
        # What a too short maxSeqLength costs, counted for the result (truncatedRows, rowsLeftOut)
        cut, left = cut_and_left_out(tok, rows, MAX_LEN, loss_on == "all")
        assert (split.truncated, split.unlearned) == (expected.truncated, expected.unlearned) == (cut, left)
        assert cut > 0 and (left > 0) == (loss_on == "assistant")
        assert [list(e["input_ids"]) for e in split.examples] == [list(e["input_ids"]) for e in expected.examples]
        assert [list(e["labels"]) for e in split.examples] == [list(e["labels"]) for e in expected.examples]
        # A process's share of an evaluation (every second example from the second), and a batch of it
        view = split.examples[1::2][2:5]
        assert [e["input_ids"].tolist() for e in view] == [list(expected.examples[i]["input_ids"]) for i in (5, 7, 9)]
        assert view.lengths() == [expected.lengths[i] for i in (5, 7, 9)] and len(split.examples[-3:]) == 3
    # The rows' raw texts are tokenized many at once: as each alone.
    one_by_one = [piece for row in rows for piece in (
        encode_text(tok, row["text"], MAX_LEN) if "text" in row else
        [encode_for_training(tok, row["messages"], MAX_LEN, every_token=loss_on == "all")]) if set(piece["labels"]) != {IGNORE}]
    assert [list(e["input_ids"]) for e in expected.examples] == [list(e["input_ids"]) for e in one_by_one]


def test_ids_are_two_bytes_where_the_vocabulary_fits_and_four_where_not(tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = encode_rows(tok, [{"text": SEA}], 16)
    ids = [list(e["input_ids"]) for e in examples]
    for vocabulary, size in ((len(tok), 2), (2 ** 17, 4)):
        directory = tmp_path / f"v{vocabulary}"
        token_files.write(examples, directory, vocabulary, token_files.Counted([]), token_files.Counter())
        assert (directory / "ids.bin").stat().st_size == size * sum(map(len, ids))
        assert [list(e["input_ids"]) for e in token_files.TokenFiles(directory)] == ids


def test_a_finished_directory_is_reused_a_partial_one_never_and_both_are_gone_when_the_run_ends(tiny_model, tmp_path,
                                                                                               caplog):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    dataset, spec = _dataset(tmp_path, _rows()[:40]), _spec(32)
    caplog.set_level("INFO", logger=token_files.__name__)
    with contextlib.ExitStack() as running:
        first = encoding.read(spec, tok, dataset, "train", ALONE, "run-a", running)
        directory = token_files.location(tok, dataset, "train", 32, False, "run-a")
        assert f"train.jsonl: 40 rows tokenized, {first.units} examples of {sum(first.lengths)} tokens" in caplog.text
        assert np.array_equal(np.load(directory / "offsets.npy"), first.examples.offsets)
        kept = tmp_path / "kept"
        shutil.copytree(directory, kept)
    assert not directory.exists()  # the run ended: its files with it

    # A container restarted in the same pod finds its finished files (here: the dataset is gone, and
    # the run still reads its examples); beside them a half-written directory of a killed writer is ignored.
    shutil.copytree(kept, directory)
    (directory.parent / f".{directory.name}-killed").mkdir()
    shutil.rmtree(dataset[7:])
    caplog.clear()
    with contextlib.ExitStack() as running:
        again = encoding.read(spec, tok, dataset, "train", ALONE, "run-a", running)
        assert again.lengths == first.lengths and again.rows == 40 and "tokenized" not in caplog.text
        # Another run (or other settings) is not given these files: it reads the dataset, here gone.
        assert encoding.read(spec, tok, dataset, "train", ALONE, "run-b", running).rows == 0
    assert not directory.exists()
    shutil.rmtree(directory.parent / f".{directory.name}-killed")


def _read_in_process(rank: int, dataset: str, model: str, out: str) -> None:
    world = World(rank=rank, size=2, local_rank=rank, device=torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(model)
    got = {}
    with contextlib.ExitStack() as running:
        for split in ("train", "validation"):
            try:
                read = encoding.read(_spec(24), tok, dataset, split, world, "two-processes", running)
                got[split] = [e["input_ids"].tolist() for e in read.examples]
            except InvalidTask as e:
                got[split] = str(e)
        Path(f"{out}-{rank}.json").write_text(json.dumps(got))
        # The first process outlives the others' reading, as in a run (which torchrun ends when one exits).
        while rank == 0 and not Path(f"{out}-1.json").exists():
            time.sleep(0.1)


def test_two_processes_map_the_files_the_first_writes_and_both_fail_on_a_malformed_row(tiny_model, tmp_path):
    """The second process waits for the first's files, and it is told of a malformed row the first
    met: an invalid task in both (the Job fails without retries), not a wait for files forever."""
    rows = _rows()[:50]
    dataset = _dataset(tmp_path, rows)
    (tmp_path / "data" / "validation.jsonl").write_bytes(dumps_jsonl(rows[:5] + [{"text": "  "}]))
    torch.multiprocessing.spawn(_read_in_process, args=(dataset, str(tiny_model), str(tmp_path / "got")), nprocs=2)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    expected = [list(e["input_ids"]) for e in encoding.encode(_spec(24), tok, rows, "train").examples]
    for rank in range(2):
        got = json.loads((tmp_path / f"got-{rank}.json").read_text())
        assert got["train"] == expected
        assert got["validation"] == ("spec.objective sft: validation.jsonl row 6: a text row's text must be a "
                                     "non-empty string, got '  '")


def test_a_benchmark_or_quantization_reads_the_first_rows_of_a_split_and_no_further(tmp_path):
    """maxSamples, calibrationSamples: the first rows of a corpus's split, not the whole split in
    memory (a line past them that is not JSON is never read)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\nnot json\n')
    assert read_split(f"file://{folder}", "test", 2) == [{"text": "one"}, {"text": "two"}]
    with pytest.raises(InvalidTask, match="test.jsonl line 4: not JSON"):
        read_split(f"file://{folder}", "test")
    assert read_split(f"file://{folder}", "train") == []  # no such split


def test_worker_processes_encode_the_same_examples_in_order_and_name_a_malformed_rows_number(tiny_model, tmp_path,
                                                                                             monkeypatch):
    """Rendering conversations is Python's work, one core's: a split of several pieces is encoded by
    a worker process a CPU, into the same files as by one process; an invalid row in a worker's
    piece is named by its number in the split."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = _rows()
    monkeypatch.setattr(token_files, "PIECE", 64)  # 600 rows: ten pieces
    monkeypatch.setattr(cpus, "available", lambda cgroup=cpus.CGROUP: 3)
    handed = []
    submit = Workers.submit
    monkeypatch.setattr(Workers, "submit", lambda self, fn, *args: handed.append(len(args[0])) or submit(self, fn, *args))
    for name, count in (("one", 1), ("three", 3)):
        monkeypatch.setattr(cpus, "available", lambda cgroup=cpus.CGROUP, count=count: count)
        counted, tally = token_files.Counted(rows), token_files.Counter()
        token_files.write(token_files.encoded_by_workers(tok, counted, MAX_LEN, False, "train.jsonl", tally), tmp_path / name,
                          len(tok), counted, tally)
    assert handed == [64] * 8 + [24]  # the first piece here, the others to the workers
    one, three = token_files.TokenFiles(tmp_path / "one"), token_files.TokenFiles(tmp_path / "three")
    assert three.rows == one.rows == 600 and three.lengths() == one.lengths()
    assert three.tally == one.tally == dict(zip(("truncated", "unlearned"), cut_and_left_out(tok, rows, MAX_LEN)))
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["labels"], b["labels"])
               for a, b in zip(one, three))
    with pytest.raises(InvalidTask, match="train.jsonl row 300: a text row's text must be a non-empty string"):
        list(token_files.encoded_by_workers(tok, rows[:299] + [{"text": "  "}] + rows[300:], 24, False, "train.jsonl"))
