"""Dataset rows on disk: ChatML ({messages}) or ShareGPT ({conversations}), JSONL per split (and
the layouts other datasets write: Alpaca's, TRL's prompt-completion, glaive's, xlam's);
raw text ({text}) for continued pre-training; preference pairs for DPO in OpenAI's or TRL's form;
TRL's unpaired rows for KTO; and prompts with reference answers for GRPO."""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from typing import Any, Iterable, Iterator

from .chat import REASONING_KEY, thought_and_said
from .store import local_copy, open_store
from .task import InvalidTask
from .glaive import glaive_messages, glaive_tools, is_glaive
from .hermes import hermes_messages, hermes_tools, is_hermes
from .tool_calls import expected_calls, openai_call
from .xlam import is_xlam, xlam_messages, xlam_tools

SPLITS = ("train", "validation", "test")
_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
# A message's role as chat templates name it, from what datasets call it: OpenAI's (developer is its
# newer name for system), and ShareGPT's (human, gpt) in either format.
ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "tool": "tool", "function": "tool"}  # function: OpenAI's legacy function results


# A BCP 47 tag (OpenAssistant's pt-BR, zh-CN; en_US) or an ISO 639 code: its first subtag is the language.
LANGUAGE_TAG = re.compile(r"([A-Za-z]{2,3})(?:[-_][A-Za-z0-9]{1,8})*")


@functools.lru_cache(maxsize=4096)
def language_code(label: str) -> str:
    """The language code a row's label names, as samplesPerLanguage and a Benchmark's languages name them
    (ISO 639-1 where a language has one, no variants): a BCP 47 tag's language (OpenAssistant's pt-BR),
    an ISO 639-3 code (Aya's eng, arb), a language's name in English or in itself (Tagengo's Russian,
    Русский); anything else (a typo, lmsys' "unknown") as written, which the counts then name."""
    import langcodes  # noqa: PLC0415  (its name index loads at the first name)

    text = label.strip()
    tag = LANGUAGE_TAG.fullmatch(text)
    try:
        return langcodes.standardize_tag(tag.group(1), macro=True) if tag else langcodes.find(text).language
    except (LookupError, ValueError):
        return tag.group(1).lower() if tag else label


def role_of(name: Any) -> str:
    """A message's role (ROLES); a ValueError naming the roles there are for anything else."""
    if not isinstance(name, str) or name not in ROLES:
        raise ValueError(f"a message's role is one of {', '.join(ROLES)}, got {str(name)[:40]!r}")
    return ROLES[name]


def to_row(messages: list[dict[str, str]], fmt: str, **extra: Any) -> dict[str, Any]:
    """A conversation as a row of the format: OpenAI's messages (an answer's reasoning in REASONING_KEY),
    or ShareGPT's turns, which have no field for it: there in <think> tags before the answer."""
    if fmt == "sharegpt":
        return {"conversations": [{"from": _SHAREGPT_ROLE[m["role"]], "value": thought_and_said(m)} for m in messages],
                **extra}
    return {"messages": messages, **extra}


def without_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with its answers' reasoning left out: as a model is asked it (DeepSeek's API
    refuses reasoning in a request, and a model is not shown earlier thoughts), and as its answers are
    cached by; a preference pair's or a graded prompt's messages."""
    return [{k: v for k, v in m.items() if k != REASONING_KEY} if REASONING_KEY in m else m for m in messages]


def preference_row(messages: list[dict[str, str]], rejected: str, **extra: Any) -> dict[str, Any]:
    """TRL's conversational preference row: the conversation's last answer chosen, `rejected` rejected."""
    return {"prompt": messages[:-1], "chosen": messages[-1:], "rejected": [{"role": "assistant", "content": rejected}],
            **extra}


# The fields a row with messages of some form holds: a row with `text` and none of them is raw text.
_MESSAGE_FIELDS = ("messages", "conversations", "prompt", "chosen", "completion", "preferred_output", "input",
                   "instruction")


def text_of(row: dict[str, Any]) -> str | None:
    """The text of a raw-text row ({text}: a document for continued pre-training, as TRL's language
    modeling rows, Axolotl's completion and torchtune's text_completion_dataset read it); None for a
    row of messages (one with text beside its messages is a conversation). A ValueError says what is
    wrong with the text."""
    if "text" not in row or any(field in row for field in _MESSAGE_FIELDS):
        return None
    if not isinstance(row["text"], str) or not row["text"].strip():
        raise ValueError(f"a text row's text must be a non-empty string, got {str(row['text'])[:80]!r}")
    return row["text"]


def _not_text(row: dict[str, Any]) -> None:
    """A ValueError for a raw-text row where rows of messages are read."""
    if text_of(row) is not None:
        raise ValueError("a text row ({text}: continued pre-training) has no prompt or answer: it trains with "
                         "objective sft only, and cannot be a preference pair, an unpaired example or a prompt")


def messages_of(row: dict[str, Any]) -> list[dict[str, str]]:
    """ChatML messages from a row in either format; of a preference row (DPO), the prompt and its
    chosen answer, and of an unpaired row (KTO), the prompt and its answer: what perplexity,
    calibration and supervised fine-tuning on such a dataset see. A raw-text row (text_of) has none."""
    if "messages" in row:
        return _as_written(row, [_message(m) for m in _listed(row["messages"], "messages", "{role, content}")])
    if "completion" in row:  # TRL's prompt-completion row (OpenAI's legacy one), or an unpaired row (KTO's)
        if "label" in row:  # checked: a label that is not true or false would have its answer learned
            [(prompt, answer, _)] = labelled_of(row)
        else:
            prompt, answer = prompt_completion(row, "a prompt-completion row")
        return prompt + answer
    if "instruction" in row:
        return _alpaca(row)
    if is_glaive(row):
        return [_message(m) for m in glaive_messages(row)]
    if is_xlam(row):
        return [_message(m) for m in xlam_messages(row)]
    if "conversations" not in row:
        prompt, chosen, _ = preference_of(row)
        return prompt + chosen
    return _as_written(row, [_sharegpt_message(c)
                             for c in _listed(row["conversations"], "conversations", "{from, value}", "value")])


def _as_written(row: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation's messages as the row means them: Hermes' texts read as tool calls (hermes.py), and
    the row's system column first (LLaMA-Factory's ShareGPT and OpenAI rows keep the system message
    there) where the conversation has none of its own; a ValueError when that is not text."""
    if is_hermes(next((m["content"] for m in messages if m["role"] == "system"), None)):
        messages = [_message(m) for m in hermes_messages(messages)]
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"a row's system is text, got {str(system)[:80]!r}")
    if not (system or "").strip() or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


# LLaMA-Factory's ShareGPT tool turns: an assistant's calls as JSON, and a tool's result.
SHAREGPT_TOOL_TURNS = ("function_call", "observation")


def _sharegpt_message(turn: dict[str, Any]) -> dict[str, Any]:
    """A ShareGPT turn as a message; LLaMA-Factory's function_call turn (a call as JSON, {name,
    arguments}, or a list of them) an assistant's tool calls, its observation a tool's result."""
    if turn.get("from") != "function_call":
        role = "tool" if turn.get("from") == "observation" else role_of(turn.get("from"))
        return {"role": role, "content": content_text(turn["value"])}
    try:
        calls = json.loads(turn["value"])
    except (TypeError, ValueError):
        raise ValueError(f"a function_call turn's value is its call as JSON ({{name, arguments}}), got "
                         f"{str(turn['value'])[:80]!r}") from None
    return _message({"role": "assistant", "content": None,
                     "tool_calls": [openai_call(call) for call in (calls if isinstance(calls, list) else [calls])]})


def _listed(messages: Any, field: str, shape: str, needs: str = "role") -> list[dict[str, Any]]:
    """A row's list of messages, each a JSON object with `needs`; a ValueError saying what it is otherwise."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and needs in m for m in messages):
        raise ValueError(f"a row's {field} are a list of {shape} messages, got {str(messages)[:80]!r}")
    return messages


# What an OpenAI chat row's message may hold beside role and content: an assistant's tool calls, a tool
# result's call id, a name, and an assistant message's weight (0: not learned, as OpenAI's fine-tuning reads it).
_MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name", "weight")
# Where rows keep an assistant's reasoning apart from its answer: vLLM's, DeepSeek's and Qwen3's field,
# OpenRouter's, and gpt-oss' (HuggingFaceH4/Multilingual-Thinking); templates are given it (chat._reasoned).
REASONING_FIELDS = (REASONING_KEY, "reasoning", "thinking")


# The content parts that hold text, and the field that holds it: Chat Completions' (text, an assistant's
# refusal) and the Responses API's (input_text, output_text).
_TEXT_PARTS = {"text": "text", "refusal": "refusal", "input_text": "text", "output_text": "text"}


def content_text(content: Any) -> str:
    """A message's content as text: a string; OpenAI's array of content parts, whose text parts (and an
    assistant's refusal) are written one after the other, as chat templates that read parts write them
    (a text-only template would write the list itself); a null content empty. A ValueError for a part
    that is not text (an image, audio, a file) or for anything else."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ValueError(f"a message's content is text or a list of content parts, got {str(content)[:80]!r}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        field = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        if field and isinstance(part.get(field), str):
            texts.append(part[field])
        else:
            raise ValueError(f"a message's content parts are text ({{type: text, text}}); the models trained and "
                             f"measured here read text only, got {str(part)[:80]!r}")
    return "".join(texts)


def reasoning_of(message: dict[str, Any]) -> Any:
    """What a row's message holds as its reasoning, in the first of REASONING_FIELDS it has (None: none)."""
    return next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)


def _message(m: dict[str, Any]) -> dict[str, Any]:
    """A row's message as templates read it (an assistant's tool calls kept, a missing or null
    content empty, as OpenAI's tool-calling turns have it, and content parts as text; a null field
    absent, as Parquet and Hugging Face datasets give every message the fields any message has). A
    ValueError says what is wrong with it."""
    kept = {"role": role_of(m["role"]), "content": content_text(m.get("content")),
            **{k: m[k] for k in _MESSAGE_KEYS if m.get(k) is not None}}
    reasoning = reasoning_of(m)
    if reasoning is not None and (not isinstance(reasoning, str) or kept["role"] != "assistant"):
        raise ValueError(f"a message's reasoning is text, on assistant messages only, got {str(reasoning)[:80]!r} "
                         f"on a {m['role']} message")
    if reasoning and reasoning.strip():
        kept[REASONING_KEY] = reasoning.strip()
    if "tool_calls" not in kept and m.get("function_call") is not None:  # OpenAI's legacy function calling
        kept["tool_calls"] = [openai_call(m["function_call"])]
    if "weight" in kept and (m["weight"] not in (0, 1) or isinstance(m["weight"], bool) or kept["role"] != "assistant"):
        raise ValueError(f"a message's weight is 0 (not learned) or 1, on assistant messages only, got "
                         f"{m['weight']!r} on a {m['role']} message")
    if not isinstance(kept.get("tool_calls", []), list):
        raise ValueError(f"a message's tool_calls are a list of calls, got {str(kept['tool_calls'])[:80]!r}")
    for call in kept.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or "arguments" not in function:
            raise ValueError("a tool call is {type: function, function: {name, arguments}}, got "
                             f"{str(call)[:80]!r}")
    if "tool_calls" in kept and kept["role"] != "assistant":
        raise ValueError(f"only assistant messages make tool calls, not {m['role']!r} ones")
    return kept


def tools_of(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The functions an OpenAI chat row offers its assistant ({tools: [{type: function, function:
    {name, description, parameters}}]}), which its chat template writes before the conversation;
    None without any. A ValueError says what is wrong with them."""
    tools = row.get("tools")
    if tools is None and isinstance(row.get("functions"), list):  # OpenAI's legacy functions
        tools = [{"type": "function", "function": f} for f in row["functions"]]
    if is_xlam(row):  # xlam's: their parameters written with Python's type names
        tools = xlam_tools(row)
    elif tools is None and is_glaive(row):  # glaive's: JSON objects after its system's words
        tools = glaive_tools(row)
    elif tools is None:  # Hermes': between <tools> and </tools> in the system turn
        tools = hermes_tools(system_turn(row))
    if tools is None:
        return None
    if isinstance(tools, str):  # JSON text, as Hugging Face datasets (and a DatasetBuild's Parquet) keep them
        try:
            tools = json.loads(tools)
        except ValueError:
            raise ValueError(f"a row's tools are not JSON: {tools[:80]!r}") from None
    if isinstance(tools, list) and all(isinstance(t, dict) and "function" not in t and "name" in t for t in tools):
        tools = [{"type": "function", "function": t} for t in tools]  # LLaMA-Factory's: the functions alone
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and isinstance(t["function"].get("name"), str) for t in tools):
        raise ValueError(f"a row's tools are [{{type: function, function: {{name, description, parameters}}}}], "
                         f"got {str(tools)[:80]!r}")
    return tools or None


def system_turn(row: dict[str, Any]) -> str | None:
    """The text of a conversation's first system turn (ShareGPT's or OpenAI's), None without one."""
    turns = row.get("conversations") if "messages" not in row else row["messages"]
    key, name = ("value", "from") if "messages" not in row else ("content", "role")
    text = next((t.get(key) for t in turns if isinstance(t, dict) and t.get(name) in ("system", "developer")),
                None) if isinstance(turns, list) else None
    return text if isinstance(text, str) else None


def undesirable(row: dict[str, Any]) -> bool:
    """An unpaired row whose answer is labelled undesirable (KTO's label false): not an answer to
    learn with sft or to measure perplexity on."""
    return "completion" in row and row.get("label") is False


# Anthropic HH-RLHF's transcripts: "\n\nHuman: ...\n\nAssistant: ..." turn after turn.
_TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _turns(value: Any, role: str) -> list[dict[str, str]]:
    """Messages of a row's field: a list of them, a transcript in Anthropic HH's form (each turn after
    "\n\nHuman: " or "\n\nAssistant: "), or a text (one message of `role`)."""
    if isinstance(value, str) and value.startswith("\n\nHuman: "):
        parts = _TRANSCRIPT_TURN.split(value)[1:]  # speaker, text, speaker, text, ...
        return [{"role": "user" if speaker == "Human" else "assistant", "content": text}
                for speaker, text in zip(parts[0::2], parts[1::2])]
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": role_of(m["role"]), "content": content_text(m["content"])} for m in value]
    raise ValueError(f"expected a string or a list of {{role, content}} messages, got {str(value)[:80]!r}")


def preference_of(row: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, chosen, rejected) messages of a preference row: OpenAI's {input: {messages},
    preferred_output, non_preferred_output}; TRL's {prompt, chosen, rejected} with strings or
    messages; or TRL's chosen and rejected whole conversations (or Anthropic HH's transcripts), whose
    common start is the prompt. A ValueError says what the row lacks."""
    _not_text(row)
    if "preferred_output" in row or "non_preferred_output" in row:
        given = row.get("input")
        prompt = _turns(given.get("messages") if isinstance(given, dict) else given, "user")
        chosen, rejected = (_turns(row.get(k), "assistant") for k in ("preferred_output", "non_preferred_output"))
    elif "chosen" in row and "rejected" in row:
        chosen, rejected = _turns(row["chosen"], "assistant"), _turns(row["rejected"], "assistant")
        if "prompt" in row and all(m["role"] == "assistant" for m in chosen):
            prompt = _turns(row["prompt"], "user")
        else:  # whole conversations (UltraFeedback's, beside a prompt column that repeats their start, as TRL's
            # maybe_extract_prompt reads them): the prompt is what they share, up to the first message that differs
            shared = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
            while shared and chosen[shared - 1]["role"] == "assistant":  # the answers start after a prompt turn
                shared -= 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        raise ValueError("a preference row needs chosen and rejected (with prompt, or as whole conversations), "
                         "or input.messages, preferred_output and non_preferred_output")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise ValueError("a preference row's prompt must end with a user (or system) message")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or any(m["role"] != "assistant" for m in answer):
            raise ValueError(f"a preference row's {name} answer must be one or more assistant messages")
    return prompt, chosen, rejected


def margin_of(row: dict[str, Any]) -> float:
    """A preference row's margin (TRL's optional column; 0 without one): how much more its chosen
    answer is preferred, e.g. from a rating's strength, as Llama 2's reward models used it. A
    ValueError says what is wrong with it."""
    margin = row.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"a preference row's margin must be a finite number, got {margin!r}")
    return float(margin)


def labelled_of(row: dict[str, Any]) -> list[tuple[list[dict[str, str]], list[dict[str, str]], bool]]:
    """(prompt, answer, desirable) examples of a row, for KTO: TRL's unpaired {prompt, completion,
    label} (strings or messages; label true for a desirable answer); a preference row gives two, its
    chosen answer desirable and its rejected one not (TRL's unpair_preference_dataset). A ValueError
    says what the row lacks."""
    _not_text(row)
    if "completion" not in row:
        if "label" in row:
            raise ValueError("an unpaired row needs prompt, completion and label")
        prompt, chosen, rejected = preference_of(row)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    if not isinstance(row.get("label"), bool):
        raise ValueError(f"an unpaired row's label must be true (a desirable answer) or false, got {row.get('label')!r}")
    prompt, answer = prompt_completion(row, "an unpaired row")
    return [(prompt, answer, row["label"])]


def prompt_completion(row: dict[str, Any], what: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, answer) messages of a row's prompt and completion, each a string or messages."""
    prompt, answer = _turns(row.get("prompt"), "user"), _turns(row["completion"], "assistant")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise ValueError(f"{what}'s prompt must end with a user (or system) message")
    if not answer or any(m["role"] != "assistant" for m in answer):
        raise ValueError(f"{what}'s completion must be one or more assistant messages")
    return prompt, answer


def alpaca_of(row: dict[str, Any]) -> tuple[str | None, str, Any]:
    """(system message, user turn, answer) of an Alpaca row {instruction, input, output}, or Dolly's
    {instruction, context, response}: the instruction, and its input (the text the instruction is about)
    after a blank line, as Axolotl's alpaca type joins them; a `system` column (Axolotl's
    alpaca_w_system) the system message. The answer as the row holds it (None without one). A
    ValueError where the instruction, input or system are not text."""
    instruction, extra, system = row["instruction"], row.get("input") or row.get("context") or "", row.get("system")
    if not isinstance(instruction, str) or not instruction.strip() or not isinstance(extra, str) \
            or not isinstance(system, (str, type(None))):
        raise ValueError(f"an Alpaca row's instruction (and input, system) are text, got {str(instruction)[:80]!r}")
    return (system if system and system.strip() else None, instruction + (f"\n\n{extra}" if extra.strip() else ""),
            row.get("output", row.get("response")))


def _alpaca(row: dict[str, Any]) -> list[dict[str, str]]:
    """An Alpaca (or Dolly) row as a conversation of one turn."""
    system, prompt, output = alpaca_of(row)
    if not isinstance(output, str):
        raise ValueError(f"an Alpaca row's output (Dolly's response) is its answer, text, got {str(output)[:80]!r}")
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt},
            {"role": "assistant", "content": output}]


def prompt_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The prompt messages of a row that holds no answer (objective grpo's): OpenAI's {messages}
    ending with a user turn (or a tool's result, after the assistant's calls), or {prompt} (a string
    or messages). A ValueError says what the row lacks."""
    _not_text(row)
    if "messages" not in row and "prompt" not in row:
        raise ValueError("needs messages (ending with a user turn) or prompt")
    value = row["messages"] if "messages" in row else row["prompt"]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return ended_by_asking([_message(m) for m in value])  # an assistant's tool calls kept
    return ended_by_asking(_turns(value, "user"))  # a string (or a ValueError saying what it is)


def ended_by_asking(prompt: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prompt, when it ends where the assistant answers: after a user message or a tool's result.
    A ValueError otherwise."""
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        raise ValueError("a prompt must end with a user message or a tool's result (the answer is sampled, "
                         "not given)")
    return prompt


def ends_with_answer(row: dict[str, Any]) -> bool:
    """Whether the row is a conversation ending with the assistant's turn (a fine-tuning row), not a prompt."""
    messages = row.get("messages")
    return isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict) \
        and messages[-1].get("role") == "assistant"


def graded_turn(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt, expected calls) of a conversation ending with the assistant's turn: the messages before
    its last turn that calls tools and that turn's calls; without one, before its last turn, which
    expects none (an answer in words). A ValueError says what is wrong with them."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    last = ([i for i in turns if messages[i].get("tool_calls")] or turns)[-1]
    return ended_by_asking(messages[:last]), expected_calls(messages[last].get("tool_calls") or [])


def dumps_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(map(jsonl_line, rows))


def jsonl_line(row: dict[str, Any]) -> bytes:
    """A row as a line of a JSONL file, as every file the runtime writes has it."""
    return (json.dumps(row, ensure_ascii=False) + "\n").encode()


def read_split(dataset_uri: str, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of one split (iter_split), or its first `limit`, read no further (a Benchmark's or a
    Quantization's few hundred of a corpus); an absent split file is an empty split."""
    return list(itertools.islice(iter_split(dataset_uri, split), limit))


def iter_split(dataset_uri: str, split: str) -> Iterator[dict[str, Any]]:
    """Rows of one split as they are read, line by line (a corpus's split is not held as bytes and
    lines besides); an absent split file has none."""
    uri = f"{dataset_uri.rstrip('/')}/{split}.jsonl"
    try:
        with local_copy(uri) as path, path.open(encoding="utf-8") as lines:
            for n, line in enumerate(lines, 1):
                if line.strip():
                    yield _row(line, uri, n)
    except FileNotFoundError:
        return


def _row(line: str, uri: str, n: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:  # a file written by hand, or cut off: no retry mends it
        raise InvalidTask(f"{uri} line {n}: not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(row, dict):
        raise InvalidTask(f"{uri} line {n}: a row is a JSON object, got {type(row).__name__}")
    return row


def no_rows(dataset_uri: str, split: str, what: str = "rows") -> str:
    """Why a split was read empty, for the error that names it: whether its file is there at all (a
    mistyped URI, a dataset built without that split) and which splits are."""
    store = open_store(dataset_uri.rstrip("/"))
    there = [f"{s}.jsonl" for s in SPLITS if store.exists(f"{s}.jsonl")]
    if f"{split}.jsonl" in there:
        why = f"its {split}.jsonl is empty"
    elif there:
        why = f"no {split}.jsonl there, only {', '.join(there)}"
    else:
        why = "none of train.jsonl, validation.jsonl, test.jsonl there: name the dataset's folder"
    return f"{dataset_uri} has no {split} {what} ({why})"
