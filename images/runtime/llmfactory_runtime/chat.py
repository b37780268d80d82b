"""Chat templates and the token masks that make training learn only the assistant's words."""

from __future__ import annotations

from typing import Any

import numpy as np

from .task import InvalidTask
from .tool_calls import arguments_object

# Templates a FineTune can ask for (spec.chatTemplate), with the markers they write as tokens. ChatML
# is also what a tokenizer without a template of its own gets (a base model's, or one trained here).
# ChatML writes tool calls as Qwen2.5 and Hermes do (vLLM's hermes tool parser reads them back): the
# tools' signatures in the system turn, each call as <tool_call>{"name", "arguments"}</tool_call> in the
# assistant's turn, the results in a user turn as <tool_response>s. A conversation without tools
# renders as plain ChatML.
_CHATML_TOOLS = ("<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
                 "{% endif %}# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                 "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
                 "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}{{ '\n' }}</tools>\n\n"
                 "For each function call, return a json object with function name and arguments within "
                 "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
                 "<|im_end|>\n")
TEMPLATES = {
    "chatml": ("{% if tools %}" + _CHATML_TOOLS + "{% endif %}"
               "{% for message in messages %}"
               "{% if tools and loop.first and message['role'] == 'system' %}"
               "{% elif message['role'] == 'tool' %}"
               "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
               "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
               "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
               "{% else %}"
               "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
               "{% for call in message.tool_calls or [] %}"
               "{% set f = call.function if call.function is defined else call %}"
               "{{ ('\n' if message['content'] or not loop.first else '') + '<tool_call>\n{\"name\": \"' + f.name"
               " + '\", \"arguments\": ' + (f.arguments if f.arguments is string else f.arguments | tojson)"
               " + '}\n</tool_call>' }}"
               "{% endfor %}"
               "{{ '<|im_end|>\n' }}"
               "{% endif %}"
               "{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
               ("<|im_start|>", "<|im_end|>")),
    # Meta's Llama 3 (and 3.1 without tools) template, as Axolotl's chat_template: llama3.
    "llama3": ("{% for message in messages %}"
               "{% if loop.first and bos_token %}{{ bos_token }}{% endif %}"
               "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
               " + '<|eot_id|>' }}"
               "{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}
CHATML_TEMPLATE = TEMPLATES["chatml"][0]

IGNORE = -100  # label value that cross-entropy skips

# A conversation to find a template's markers and end of turn with (no system message: Gemma's
# and Mistral-Instruct-v0.1's templates refuse one).
_SAMPLE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi there."},
           {"role": "user", "content": "Bye."}]


def template_of(spec: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """The template a FineTune asks for (spec.chatTemplate) and the markers it writes as tokens;
    None for the model's own."""
    name = spec.get("chatTemplate", "model")
    if name == "jinja":
        return spec["chatTemplateJinja"], tuple(spec.get("chatTemplateTokens") or ())
    return None if name == "model" else TEMPLATES[name]


def use_template(tokenizer, template: str, markers: tuple[str, ...]) -> list[int]:
    """`template` for the tokenizer, its `markers` added as special tokens where the vocabulary
    lacks them, as TRL's setup_chat_format does for ChatML: as plain text each would be several
    ordinary tokens, and the end-of-turn marker no token a model could learn to end its turn with or
    generation could stop on. The ids it added, whose rows the model never trained: the model grows
    rows for them where it has none (models.fit_embeddings), and an adapter trains them."""
    tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    missing = [marker for marker in markers if marker not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(missing)


def _special_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens, by their text (what a template writes); not the added tokens
    that are ordinary text (runs of spaces, as some code models' tokenizers add)."""
    tokens = {token.content: i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return {**tokens, **{t: i for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)}}


def marker_ids(tokenizer) -> list[int]:
    """The special tokens the chat template writes around messages (ChatML's <|im_start|>, Llama 3's
    <|start_header_id|>, ...): rows every conversation the model is trained on goes through."""
    try:
        text = render(tokenizer, _SAMPLE, add_generation_prompt=True) + render(tokenizer, _SAMPLE[:2])
    except (InvalidTask, ValueError):  # no template, or one that refuses even this
        return []
    return sorted({i for token, i in _special_tokens(tokenizer).items() if token in text})


def end_of_turn(tokenizer) -> int | None:
    """The special token the chat template closes an assistant's turn with (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>), which generation stops on: often
    not the tokenizer's end-of-sequence. None where the answer is followed by no such token."""
    try:
        prompt = render(tokenizer, _SAMPLE[:1], add_generation_prompt=True)
        answered = render(tokenizer, _SAMPLE[:2])
    except (InvalidTask, ValueError):
        return None
    answer = _SAMPLE[1]["content"]
    at = answered.find(answer, len(prompt)) if answered.startswith(prompt) else -1
    after = answered[at + len(answer):].lstrip() if at >= 0 else ""
    ends = [(len(token), i) for token, i in _special_tokens(tokenizer).items() if token and after.startswith(token)]
    return max(ends)[1] if ends else None


# An assistant message's reasoning (its chain of thought) as rows hold it: vLLM's, DeepSeek's and Qwen3's
# name, which data._message gives the others (gpt-oss' thinking, OpenRouter's reasoning).
REASONING_KEY = "reasoning_content"
# Where a message's reasoning is written: the field a template reads it from, Qwen3's
# reasoning_content and gpt-oss's thinking, or else before the answer in <think> tags, as DeepSeek-R1's
# distilled models and the datasets of inline traces (OpenThoughts) write it.
_PROBE = "\u2063probe\u2063"
_writes_reasoning: dict[str, bool] = {}  # by template text


def writes_reasoning(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes an assistant message's reasoning field."""
    from jinja2 import TemplateError  # noqa: PLC0415 - transformers' own dependency

    template = str(tokenizer.chat_template)
    if template not in _writes_reasoning:
        probe = [_SAMPLE[0], {**_SAMPLE[1], REASONING_KEY: _PROBE, "thinking": _PROBE}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False)
        except (TemplateError, ValueError, TypeError):  # one that cannot render this writes nothing of it
            text = ""
        _writes_reasoning[template] = _PROBE in text
    return _writes_reasoning[template]


def thought_and_said(message: dict[str, Any]) -> str:
    """The message's content, after its reasoning in <think> tags where it has any."""
    reasoning = message.get(REASONING_KEY)
    return f"<think>\n{reasoning}\n</think>\n\n{message.get('content') or ''}" if reasoning else message["content"]


def reasoning_apart(text: str) -> tuple[str, str]:
    """A text's reasoning and its answer, as a reasoning model writes them: the reasoning in <think> tags
    before the answer (Qwen3's, and OpenR1's rows), or ended by </think> alone where the generation
    prompt opened the tag (DeepSeek-R1's distilled models'), as vLLM's reasoning parsers part them;
    ("", text) where it holds none, (reasoning, "") where the reasoning never ended (cut at the
    answer's token limit)."""
    if text.lstrip().startswith("<think>"):
        thought, closed, answer = text.lstrip()[len("<think>"):].partition("</think>")
        return thought.strip(), answer.strip() if closed else ""
    thought, closed, answer = text.partition("</think>")
    if closed and "<think>" not in thought:
        return thought.strip(), answer.strip()
    return "", text


def said(answer: str) -> str:
    """An answer without the reasoning a model wrote before it (reasoning_apart): what a judge rates
    and a later turn sees of it; "" where the reasoning never ended."""
    return reasoning_apart(answer)[1]


def _reasoned(message: dict[str, Any], in_field: bool) -> dict[str, Any]:
    """An assistant message's reasoning where the template writes it: in both fields templates read, or
    in <think> tags before its content."""
    if not message.get(REASONING_KEY):
        return message
    if in_field:
        return {**message, "thinking": message[REASONING_KEY]}
    return {**{k: v for k, v in message.items() if k != REASONING_KEY}, "content": thought_and_said(message)}


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """The message as chat templates read it: a tool call's arguments as an object, not OpenAI's JSON
    text, as vLLM's server hands them to a template (Qwen2.5's and Hermes' write them with tojson), so
    that training, both engines and a served model see the same calls."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        arguments = call["function"]["arguments"]
        parsed = arguments_object(arguments) if isinstance(arguments, str) else None
        calls.append({**call, "function": {**call["function"], "arguments": arguments if parsed is None else parsed}})
    return {**message, "tool_calls": calls}


def unwritten(text: str, tools: list[dict] | None, calls: list[dict] = ()) -> list[str]:
    """The names of the tools (and tool calls) a rendered text leaves out."""
    return [t["function"]["name"] for t in [*(tools or []), *calls] if t["function"]["name"] not in text]


def refuse_unwritten(missing: list[str]) -> None:
    """An invalid task when a template left out a tool or a call (`unwritten`): the model would learn
    (or be asked) to call what it never saw."""
    if missing:
        raise InvalidTask(f"the chat template does not write the tools or tool calls the data holds ({missing[0]} "
                          "left out): a FineTune's spec.chatTemplate chatml writes them as Qwen2.5 and Hermes "
                          "do; or use a model whose template writes them")


# Where a tokenizer keeps the arguments its model's template is rendered with (a model input's
# chatTemplateKwargs: Qwen3's enable_thinking), for every render of this process; never saved with it.
_TEMPLATE_KWARGS = "llmfactory_chat_template_kwargs"


def set_template_kwargs(tokenizer, kwargs: dict[str, Any]) -> None:
    """Render every conversation of this tokenizer with these template arguments."""
    setattr(tokenizer, _TEMPLATE_KWARGS, dict(kwargs))


def template_kwargs(tokenizer) -> dict[str, Any]:
    """The template arguments the tokenizer renders with (set_template_kwargs), {} for none."""
    return getattr(tokenizer, _TEMPLATE_KWARGS, {})


def apply_template(tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None = None, **kwargs: Any):
    """tokenizer.apply_chat_template, where a template that refuses a conversation (raise_exception in
    its Jinja: Mistral-7B-Instruct-v0.1's and Gemma's refuse a system message) is an invalid task
    saying what it was given, not a crash to retry."""
    from jinja2 import TemplateError  # noqa: PLC0415 - transformers' own dependency

    try:
        offered = {"tools": tools} if tools else {}
        if any(m.get(REASONING_KEY) for m in messages):
            in_field = writes_reasoning(tokenizer)
            messages = [_reasoned(m, in_field) for m in messages]
        return tokenizer.apply_chat_template([_for_template(m) for m in messages], **offered,
                                             **{**template_kwargs(tokenizer), **kwargs})
    except TemplateError as exc:
        roles = ", ".join(m["role"] for m in messages)
        raise InvalidTask(f"the model's chat template refuses a conversation of roles {roles}: {exc} (a FineTune "
                          "renders its data with another template with spec.chatTemplate chatml, llama3 or "
                          "jinja)") from None


def check_own_template(tokenizer) -> None:
    """A FineTune's own template (spec.chatTemplateJinja), tried on a conversation before any data:
    it must render one, writing the answer where the conversation before it ended, for the loss to find
    each answer."""
    from jinja2 import TemplateError  # noqa: PLC0415

    try:
        tokenizer.apply_chat_template(_SAMPLE[:2], tokenize=False)
    except TemplateError as exc:
        raise InvalidTask(f"spec.chatTemplateJinja: does not render a conversation of a user and an assistant "
                          f"turn: {exc}") from None
    try:
        assistant_spans(tokenizer, _SAMPLE[:2])
    except InvalidTask as exc:  # e.g. it refuses add_generation_prompt
        raise InvalidTask(f"spec.chatTemplateJinja: {exc}") from None
    except ValueError as exc:
        raise InvalidTask(f"spec.chatTemplateJinja: {exc}: it must write each message where the conversation "
                          "before it ended") from None


class NotPrefixByPrefix(ValueError):
    """A chat template writes a conversation's earlier messages otherwise than it wrote them when they
    were the last: Qwen3's drops the reasoning of answers before the last question (and writes an empty
    <think> block before the last answers), Mistral's writes the tools before the last question."""


def render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
           tools: list[dict] | None = None) -> str:
    return apply_template(tokenizer, messages, tools, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, Any]], first: int = 0,
                    tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation (with the `tools` it offers) and the character spans written by the
    assistant (each answer, its reasoning, its tool calls and its end-of-turn marker, so the model learns
    to stop), from message `first` on; an answer of weight 0 (OpenAI's) is not learned. A template that
    leaves out the tools, a tool call or an answer's reasoning is an invalid task: the model would learn
    to call what it never saw, or answer without the thought the data holds."""
    text = render(tokenizer, messages, tools=tools)
    missing = unwritten(text, tools)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < first:
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        # the last message's conversation is the text itself: a one-turn conversation costs two renders
        through = text if i == len(messages) - 1 else render(tokenizer, messages[: i + 1], tools=tools)
        if not text.startswith(through) or not through.startswith(prefix):
            raise NotPrefixByPrefix("the chat template does not render conversations prefix by prefix; "
                                    "assistant-only loss cannot be located")
        missing += unwritten(through[len(prefix):], None, msg.get("tool_calls") or [])
        content = msg.get("content")
        thought = msg.get(REASONING_KEY) or (reasoning_apart(content)[0] if isinstance(content, str) else "")
        if thought and thought not in through[len(prefix):]:
            raise InvalidTask("the chat template drops the reasoning the data holds (as DeepSeek-R1's distilled "
                              "models' template drops what comes before </think>): a FineTune's spec.chatTemplate "
                              "chatml writes it in <think> tags before the answer")
        if msg.get("weight", 1):
            spans.append((len(prefix), len(through)))
    refuse_unwritten(missing)
    return text, spans


def training_views(tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                   every_token: bool = False) -> list[tuple[str, list[tuple[int, int]]]]:
    """The texts a conversation is learned from, each with its assistant spans (assistant_spans): the
    conversation itself where its template writes it prefix by prefix; else (NotPrefixByPrefix: Qwen3's)
    one text an answer learned, the conversation up to it as the template writes it then, so that each
    answer is learned as the model writes it after that conversation, its reasoning with it. Every
    token learned (every_token): the conversation as the template writes it, once."""
    try:
        return [assistant_spans(tokenizer, messages, tools=tools)]
    except NotPrefixByPrefix:
        if every_token:
            text = render(tokenizer, messages, tools=tools)
            refuse_unwritten(unwritten(text, tools))
            return [(text, [])]
    try:
        return [assistant_spans(tokenizer, messages[: i + 1], first=i, tools=tools)
                for i, msg in enumerate(messages) if msg["role"] == "assistant" and msg.get("weight", 1)]
    except NotPrefixByPrefix:
        raise InvalidTask("the chat template does not write an answer where its generation prompt ends, so the "
                          "loss cannot find the answers: a FineTune's spec.chatTemplate chatml (or llama3, or "
                          "jinja) renders the data with a template that does") from None


def encode_for_training(tokenizer, messages: list[dict[str, Any]], max_length: int, first: int = 0,
                        every_token: bool = False, tools: list[dict] | None = None) -> dict[str, Any]:
    """input_ids and labels, where labels are IGNORE everywhere but on assistant tokens (of the
    messages from `first` on: a DPO pair's answers, not its prompt's earlier turns; not an answer of
    weight 0); with every_token (hyperparameters.lossOn all) the labels are every token's."""
    [encoded] = encode_many_for_training(tokenizer, [assistant_spans(tokenizer, messages, first, tools)], max_length,
                                         every_token)
    return encoded


def encode_many_for_training(tokenizer, rendered: list[tuple[str, list[tuple[int, int]]]], max_length: int,
                             every_token: bool = False) -> list[dict[str, Any]]:
    """encode_for_training of conversations already rendered (assistant_spans: text, assistant spans),
    tokenized in one call, which the tokenizers library spreads over its threads; a token is learned
    where it starts inside a span. A conversation cut at max_length says so ("truncated": True)."""
    if not rendered:
        return []
    encodings = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
                          truncation=True, max_length=max_length)
    out = []
    for (text, spans), ids, offsets in zip(rendered, encodings["input_ids"], encodings["offset_mapping"]):
        # cut where text is left after the last token (the tokenizer truncates after encoding it all)
        cut = {"truncated": True} if len(ids) >= max_length and text[offsets[-1][1]:].strip() else {}
        if every_token:
            out.append({"input_ids": ids, "labels": list(ids), **cut})
            continue
        starts = np.array([start for start, _end in offsets], dtype=np.int64)
        inside = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            inside |= (starts >= a) & (starts < b)
        out.append({"input_ids": ids, "labels": np.where(inside, ids, IGNORE).tolist(), **cut})
    return out
