"""Prompts from the sources of a DatasetBuild: inline lists, JSONL and Parquet files (in the
store or a mounted ConfigMap), Hugging Face datasets; rows in prompt-column, ShareGPT,
OpenAI-messages, Alpaca, glaive, xlam or preference-pair (TRL's prompt, chosen, rejected) shape, or documents
(format text: a text column).

A prompt is {turns: [user messages], system, language, answers}: the teacher answers every turn of
a multi-turn conversation (or the first, with `turns: first`). `answers` are the row's own answers to
its turns, which a build without a teacher keeps (None where the row has none: a prompt column
without answerField, a conversation whose turns are not each answered); a preference pair's prompt
also holds its `rejected` answer to the last turn, and its `scores` (chosen, rejected) where the row
rates both (UltraFeedback's score_chosen and score_rejected); a prompt of a source with a fixed
`split` holds it. Malformed rows are counted and a few shown in the report, not fatal, unless a
source's first rows are all malformed: that is a mapping that does not fit the data (a misspelt
promptField), which fails the build naming the reason and the row's fields.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from .. import CONFIG_MAPS_DIR, CONFIG_MAPS_ENV
from .. import glaive, hermes, xlam
from ..data import (ROLES, SHAREGPT_TOOL_TURNS, alpaca_of, content_text, language_code, messages_of, preference_of,
                    prompt_completion, reasoning_of, system_turn, tools_of, undesirable)
from ..store import local_copy
from ..task import InvalidTask

UNKNOWN_LANGUAGE = "und"
PARQUET_BATCH = 1024
# A fixed test (then validation) source's rows come first: a duplicate of one is dropped from the
# others, so no held-out question is trained on, whatever the sources' order.
HELD_OUT_FIRST = {"test": 0, "validation": 1}
UNREADABLE = 1000  # a source whose first rows are all malformed (or all of them, if fewer) fails the build
EXAMPLES_PER_REASON = 3
USER_ROLES, SYSTEM_ROLES, ASSISTANT_ROLES = ({name for name, role in ROLES.items() if role == kind}
                                             for kind in ("user", "system", "assistant"))


class Drops:
    """Rows dropped, by reason, with a few examples of each for the report."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: Any = "", n: int = 1) -> None:
        """example: the row or text, or a function that gives it (read only for the few shown)."""
        self.counts[reason] += n
        shown = self.examples.setdefault(reason, [])
        if callable(example) and len(shown) < EXAMPLES_PER_REASON:
            example = example()
        if example and len(shown) < EXAMPLES_PER_REASON:
            text = example if isinstance(example, str) else json.dumps(example, ensure_ascii=False, default=str)
            shown.append(text if len(text) <= 120 else text[:117] + "...")


def _rows_of_uri(uri: str, field: str) -> Iterable[Any]:
    try:
        with local_copy(uri) as path:
            yield from _rows_of_file(path, f"{field}: {uri}")
    except FileNotFoundError:
        raise InvalidTask(f"{field}: there is no file at {uri}") from None


def _rows_of_config_map(file: dict[str, str], field: str) -> Iterable[Any]:
    """The mounted file, checked against the content the run was planned for."""
    path = Path(os.environ.get(CONFIG_MAPS_ENV, CONFIG_MAPS_DIR)) / file["name"] / file["key"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidTask(f"{field}: ConfigMap {file['name']} key {file['key']} is not mounted at {path}") from None
    if hashlib.sha256(data).hexdigest() != file["sha256"]:
        raise InvalidTask(f"{field}: ConfigMap {file['name']} changed after this run was planned; the operator "
                          "plans a new run for the new content")
    yield from _rows_of_file(path, f"{field}: ConfigMap {file['name']} key {file['key']}")


def _opens(stream) -> str:
    """The text file's first character that is not white space ('' for none), the stream back at its start."""
    while (chunk := stream.read(4096)) and not chunk.strip():
        pass
    stream.seek(0)
    return chunk.lstrip()[:1]


def _refuse_one_object(stream, what: str) -> None:
    """An InvalidTask for a .json file that is one JSON object over several lines (rows under one of its
    keys, as SQuAD's data, which Hugging Face reads with field=): its lines are not rows. A file whose
    first line is a JSON object is JSON lines (the stream back at its start)."""
    while not (first := stream.readline()).strip():
        pass
    try:
        json.loads(first)
        whole = None
    except ValueError:
        stream.seek(0)
        try:
            whole = json.load(stream)
        except ValueError:
            whole = None
    stream.seek(0)
    if not isinstance(whole, dict):
        return
    lists = [key for key, value in whole.items() if isinstance(value, list)]
    under = (f"; write the rows under {lists[0]} as JSON lines: jq -c '.{lists[0]}[]'"
             if len(lists) == 1 and lists[0] not in ("messages", "conversations") else "")  # not one row's turns
    raise InvalidTask(f"{what} is one JSON object (keys: {', '.join(map(str, whole))[:200]}), not rows: a .json "
                      f"source holds JSON lines or one JSON array of rows{under}")


def _rows_of_file(path: Path, what: str) -> Iterable[Any]:
    """The file's rows, read a piece at a time (a corpus may be larger than memory): a Parquet
    file's by row batch, a JSONL file's by line; a .json file holding one JSON array, whole (one holding
    an object is refused)."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq  # noqa: PLC0415 - only for Parquet sources

        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH):
            yield from batch.to_pylist()
    elif path.name.endswith((".jsonl", ".json")):
        with path.open(encoding="utf-8", errors="replace") as lines:
            first = _opens(lines) if path.name.endswith(".json") else ""
            if first == "{":
                _refuse_one_object(lines, what)
            if first == "[":  # one JSON array, as Alpaca's alpaca_data.json
                try:
                    rows = json.load(lines)
                except ValueError as exc:
                    raise InvalidTask(f"{what}: a JSON array that does not parse: {exc}") from None
                yield from rows
                return
            for line in lines:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        yield line.rstrip("\r\n")  # counted as malformed by the caller
    else:
        raise InvalidTask(f"{what} is neither .jsonl nor .parquet")


def rows_of_huggingface(hf: dict[str, Any], streaming: bool = False) -> Iterable[Any]:
    """The split's rows in file order. streaming: read as they are iterated, shard by shard, so that
    the first rows of a corpus (a source's maxRows of FineWeb or Wikipedia) cost those rows' shards,
    not the whole split's download and its Arrow copy on disk."""
    import datasets  # noqa: PLC0415 - only for Hugging Face sources

    try:
        ds = datasets.load_dataset(hf["id"], name=hf.get("config"), split=hf.get("split", "train"),
                                   revision=hf.get("revision"), streaming=streaming)
        yield from ds
    except FileNotFoundError as exc:  # no such dataset, split or data files: the spec is wrong
        raise InvalidTask(f"huggingface dataset {hf['id']}: {exc}") from None


def _shape(row: dict[str, Any], fields: str) -> str:
    if fields != "auto":
        return fields
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "openai"
    if "instruction" in row:
        return "alpaca"
    if glaive.is_glaive(row):
        return "glaive"
    if xlam.is_xlam(row):
        return "xlam"
    return "prompt"


def _moved_conversation(row: Any, source: dict[str, Any]) -> Any:
    """The row with its conversation where the readers look for it: the source's messagesField column
    (lmsys-chat-1m's and WildChat's conversation, which fields auto reads by itself) as messages
    ({role, content}; Capybara's exchanges [{input, output}] as a user's and an assistant's) or
    conversations ({from, value}: sharegpt). A KeyError for a row without the column messagesField names."""
    field = source.get("messagesField")
    if field is None and isinstance(row, dict) and "messages" not in row and "conversations" not in row \
            and source.get("fields", "auto") == "auto" and isinstance(row.get("conversation"), list):
        field = "conversation"
    if field is None or not isinstance(row, dict):
        return row
    turns = row[field]
    if isinstance(turns, list) and turns and all(isinstance(t, dict) and t.keys() == {"input", "output"} for t in turns):
        turns = [m for t in turns for m in ({"role": "user", "content": t["input"]},
                                            {"role": "assistant", "content": t["output"]})]
    sharegpt = source.get("fields") == "sharegpt" or (source.get("fields", "auto") == "auto" and isinstance(
        turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0])
    rest = {k: v for k, v in row.items() if k not in (field, "messages", "conversations")}
    return {**rest, "conversations" if sharegpt else "messages": turns}


def _pair(row: dict[str, Any], prompt_field: str) -> tuple[list[tuple[str, str]], str]:
    """A preference row, in any form a FineTune reads (data.preference_of: TRL's, OpenAI's, Anthropic HH's
    transcripts), as (the conversation up to and with the chosen answer, the rejected answer): its prompt
    from promptField where the source names another column, then each side's last message."""
    if prompt_field != "prompt" and row.get(prompt_field):
        row = {**row, "prompt": row[prompt_field]}
    prompt, chosen, rejected = preference_of(row)
    return [(m["role"], m["content"]) for m in [*prompt, chosen[-1]]], rejected[-1]["content"]


def _turns(row: dict[str, Any], shape: str, source: dict[str, Any]) -> tuple[list[str], str | None, list | None]:
    """(user turns, system message, the row's answers to them or None) of one row;
    ValueError/KeyError/TypeError when malformed."""
    if shape == "prompt":
        field, answer_field = source.get("promptField", "prompt"), source.get("answerField")
        if field == "prompt" and not answer_field and "completion" in row:  # TRL's prompt-completion row
            prompt, answer = prompt_completion(row, "a prompt-completion row")
            return _conversation([(m["role"], m["content"]) for m in prompt + answer])
        return [row[field]], None, [row[answer_field]] if answer_field else None
    if shape == "alpaca":
        system, prompt, output = alpaca_of(row)
        return [prompt], system, [output]
    if shape == "sharegpt":
        return _conversation([(m["from"], m["value"]) for m in row["conversations"]])
    if shape == "glaive":
        return _conversation([(m["role"], m["content"]) for m in glaive.glaive_messages(row)])
    if shape == "xlam":  # a row of xlam's layout is kept whole (_uses_tools): this one is not
        raise ValueError("an xlam row is {query, tools, answers}")
    return _conversation([(m["role"], content_text(m["content"])) for m in row["messages"]])


def _conversation(items: list[tuple[str, str]]) -> tuple[list[str], str | None, list[str] | None]:
    """(user turns, system message, answers) of a conversation's (role, text) messages."""
    system = next((text for role, text in items if role in SYSTEM_ROLES), None)
    return [text for role, text in items if role in USER_ROLES], system, _answers(items)


def _answers(items: list[tuple[str, str]]) -> list[str] | None:
    """The assistant message after each user turn, where the messages alternate from a user turn (a
    last turn may be unanswered: `answered` leaves it out); else None."""
    spoken = [(role, text) for role, text in items if role not in SYSTEM_ROLES]
    users, answers = spoken[0::2], spoken[1::2]
    if any(role not in USER_ROLES for role, _ in users) or any(role not in ASSISTANT_ROLES for role, _ in answers):
        return None
    return [text for _, text in answers] or None


def _document(row: Any, source: dict[str, Any], default_lang: str) -> dict[str, Any]:
    """A row's document (format text: its textField) as a prompt of one turn, which language detection,
    the duplicate filters and sampling read as they read a prompt."""
    text = row[source.get("textField") or "text"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no text")
    return {"turns": [text.strip()], "system": None, "answers": None, "language": _language(row, source, default_lang)}


def _language(row: dict[str, Any], source: dict[str, Any], default_lang: str) -> str:
    """The language the row names in the source's languageField (language_code), else the source's."""
    lang = row.get(source.get("languageField", "language"))
    return language_code(lang) if isinstance(lang, str) and lang.strip() else default_lang


def _prompt(row: Any, source: dict[str, Any], default_lang: str, documents: bool = False) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise TypeError("not an object")
    if documents:
        return _document(row, source, default_lang)
    shape = _shape(row, source.get("fields", "auto"))
    rejected = None
    if shape == "preference":  # a pair answers its last turn twice: the rejected answer goes along
        items, rejected = _pair(row, source.get("promptField", "prompt"))
        if not isinstance(rejected, str):
            raise ValueError("a pair's rejected answer is text")
        turns, system, answers = _conversation(items)
    else:
        turns, system, answers = _turns(row, shape, source)
    # LLaMA-Factory's conversations keep their system message in a system column
    system_field = source.get("systemField") or ("system" if shape in ("sharegpt", "openai") else None)
    system = system or _system(row, system_field) or source.get("systemPrompt")
    if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError("no user text")
    if source.get("turns") == "first":
        turns = turns[:1]
    prompt = {"turns": [t.strip() for t in turns], "system": system, "answers": answers and answers[:len(turns)],
              "language": _language(row, source, default_lang)}
    if answers and (thoughts := _reasoning(row, shape)):
        prompt["reasoning"] = thoughts
    if rejected is not None:
        prompt["rejected"] = rejected.strip()
        if _number(row.get("score_chosen")) is not None and _number(row.get("score_rejected")) is not None:
            prompt["scores"] = (_number(row["score_chosen"]), _number(row["score_rejected"]))
    return prompt


def _reasoning(row: dict[str, Any], shape: str) -> list[str | None] | None:
    """The reasoning each answer of a conversation keeps apart from it (data.reasoning_of: vLLM's and
    DeepSeek's reasoning_content, gpt-oss' thinking), by the answer's turn; None where none does."""
    turns = row.get("messages") if shape == "openai" else row.get("conversations") if shape == "sharegpt" else None
    answers = [t for t in turns or []
               if isinstance(t, dict) and ROLES.get(str(t.get("role", t.get("from")))) == "assistant"]
    thoughts = [r.strip() or None if isinstance(r := reasoning_of(t), str) else None for t in answers]
    return thoughts if any(thoughts) else None


def _uses_tools(row: Any, fields: str) -> bool:
    """A function-calling conversation (OpenAI's: an assistant's tool_calls or function_call, a tool's
    result; LLaMA-Factory's ShareGPT function_call and observation turns; glaive's <functioncall>; Hermes'
    <tools> in its system turn; xlam's answers, unless the source reads its query as a prompt column), or
    one that offers tools without calling them (its tools or functions; glaive's after its system): the
    answer that calls none is what it teaches then. A build that answers turn by turn in plain text would
    lose the calls or the tools, so it drops the row as tool_calls; one that keeps the sources' own
    conversations keeps it whole (_whole)."""
    if not isinstance(row, dict):
        return False
    messages, turns = row.get("messages"), row.get("conversations")
    if (messages is not None or turns is not None) and (row.get("tools") not in (None, "", "[]", [])
                                                        or row.get("functions")):
        return True  # a conversation's; a prompt column's row is read as its prompt, as before
    listed = [t for t in (messages if isinstance(messages, list) else turns if isinstance(turns, list) else [])
              if isinstance(t, dict)]
    if any(t.get("tool_calls") or t.get("function_call") or t.get("role") in ("tool", "function")
           or t.get("from") in SHAREGPT_TOOL_TURNS for t in listed):
        return True
    return (hermes.is_hermes(system_turn(row)) or glaive.uses_tools(row)
            or (fields in ("auto", "xlam") and xlam.is_xlam(row)))


def _whole(row: dict[str, Any], source: dict[str, Any], default_lang: str) -> dict[str, Any]:
    """A function-calling conversation kept as it is (whole: its messages, an assistant's calls and the
    tools' results among them, and the tools it offers), with its user turns, system message and text
    answers for what reads a prompt (language detection, dedupe, sampling) and the answer filters; a
    source's system prompt goes first where it has none. ValueError when malformed."""
    messages, tools = messages_of(row), tools_of(row)
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a function-calling conversation ends with the assistant's turn")
    turns = [m["content"].strip() for m in messages if m["role"] == "user"]
    if not turns or not all(turns):
        raise ValueError("no user text")
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    if system is None and (system := _system(row, source.get("systemField")) or source.get("systemPrompt")):
        messages = [{"role": "system", "content": system}, *messages]
    return {"turns": turns, "system": system, "language": _language(row, source, default_lang),
            "answers": [m["content"] for m in messages if m["role"] == "assistant" and m["content"].strip()],
            "whole": {"messages": messages, **({"tools": tools} if tools else {})}}


def _number(value: Any) -> float | None:
    """A number of the row's (a pair's score_chosen, score_rejected as UltraFeedback's; an answer): a
    finite int or float, else None (a pair is then unscored)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _system(row: dict[str, Any], field: str | None) -> str | None:
    """The system message in the row's `field` column (a source's systemField), None when empty."""
    value = row.get(field) if field else None
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{field} is not text")
    return value if value and value.strip() else None


def answered(prompt: dict[str, Any]) -> dict[str, Any] | None:
    """The prompt cut to the turns its row answers, each answer stripped (a build without a teacher
    keeps them); None when its row answers none, or not with text (a number is its text: an answer
    column of final answers, 72, made a graded build's references)."""
    answers = [str(a) if _number(a) is not None else a for a in prompt["answers"] or []]
    if not answers or not all(isinstance(a, str) for a in answers):
        return None
    return {**prompt, "turns": prompt["turns"][:len(answers)], "answers": [a.strip() for a in answers]}


def collect(sources: list[dict[str, Any]], drops: Drops, config_maps: dict[str, dict[str, str]] | None = None,
            with_answers: bool = False, documents: bool = False, whole_tools: bool = False) -> Iterator[dict[str, Any]]:
    """{turns, system, language, answers} of every source's rows, as they are read: a fixed test
    source's first, then a validation source's, then the others in order (HELD_OUT_FIRST).
    `config_maps`: the task's inputs.configMaps ({source index: {name, key, sha256}}). with_answers:
    only the turns the rows answer (answered), a row that answers none dropped (no_answer). documents
    (format text): each row's document, its one turn. whole_tools: a function-calling conversation is
    kept whole (_whole), else dropped (tool_calls)."""
    ordered = sorted(enumerate(sources), key=lambda s: HELD_OUT_FIRST.get(s[1].get("split"), len(HELD_OUT_FIRST)))
    for index, source in ordered:
        default_lang = source.get("language") or UNKNOWN_LANGUAGE
        split = {"split": source["split"]} if source.get("split") else {}
        if "inline" in source:
            yield from ({"turns": [p["text"]], "system": source.get("systemPrompt"), "answers": None,
                         "language": p.get("language") or default_lang, **split} for p in source["inline"])
            continue
        field = f"spec.sources[{index}]"
        if "huggingface" in source:
            rows = rows_of_huggingface(source["huggingface"], streaming=bool(source.get("maxRows")))
        elif "configMap" in source:
            rows = _rows_of_config_map((config_maps or {})[str(index)], f"{field}.configMap")
        else:
            rows = _rows_of_uri(source["uri"], f"{field}.uri")
        read, malformed, first_error = 0, 0, None
        for n, row in enumerate(rows):
            if source.get("maxRows") and n >= source["maxRows"]:
                break
            if malformed == read == UNREADABLE:
                _refuse_unreadable(field, source, f"first {read}", first_error, documents)
            read += 1
            try:  # the row as read is what a report shows; `moved`, what the readers read
                moved = row if documents else _moved_conversation(row, source)
                calls = not documents and _uses_tools(moved, source.get("fields", "auto"))
                if calls and not whole_tools:  # a FineTune reads such rows whole, by dataset.uri
                    drops.add("tool_calls", row)
                    continue
                if with_answers and isinstance(moved, dict) and undesirable(moved):  # KTO's label false: not to keep
                    drops.add("undesirable", row)
                    continue
                prompt = (_whole(moved, source, default_lang) if calls
                          else _prompt(moved, source, default_lang, documents))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                malformed += 1
                first_error = first_error or (exc, row)
                drops.add("malformed", row)
                continue
            if with_answers and not calls:
                kept = answered(prompt)
                if kept is None:
                    drops.add("no_answer", prompt["turns"][0])
                    continue
                prompt = kept
            yield {**prompt, **split}
        if malformed and malformed == read:
            _refuse_unreadable(field, source, str(read), first_error, documents)


# The fields of a source that say where its rows hold what, by its `fields`.
MAPPINGS = {"auto": "fields, messagesField, promptField and answerField", "prompt": "fields, promptField and answerField",
            "openai": "fields and messagesField", "sharegpt": "fields and messagesField"}


def _refuse_unreadable(field: str, source: dict[str, Any], read: str, first_error: tuple[Exception, Any],
                       documents: bool) -> None:
    """A source none of whose (first) rows could be read: the mapping does not fit the data."""
    exc, row = first_error
    reason = f"no field {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
    found = f"its fields: {', '.join(map(str, row))}" if isinstance(row, dict) else f"a {type(row).__name__}"
    mapping = "textField" if documents else MAPPINGS.get(source.get("fields", "auto"), "fields")
    raise InvalidTask(f"{field}: none of its {read} rows could be read, the first: {reason} ({found}); "
                      f"check {mapping}")
