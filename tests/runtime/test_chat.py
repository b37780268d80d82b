"""Loss only on the assistant's words: the mask is exact, checked by hand on small cases."""

import json
import re

import pytest
from transformers import AutoTokenizer

from llmfactory_runtime.chat import IGNORE, encode_for_training, render

from finetune_helpers import OWN_SPEC, OWN_TEMPLATE, TOOL_ROW, WEATHER, qwen3_like


def _learned_spans(tok, messages, max_len=512, tools=None) -> list[str]:
    """The runs of consecutive learned tokens, decoded together (a Cyrillic letter is two byte tokens)."""
    enc = encode_for_training(tok, messages, max_len, tools=tools)
    assert len(enc["input_ids"]) == len(enc["labels"])
    spans, run = [], []
    for token, label in zip(enc["input_ids"] + [None], enc["labels"] + [IGNORE]):
        if label == IGNORE:
            if run:
                spans.append(tok.decode(run))
            run = []
        else:
            assert label == token
            run.append(token)
    return spans


def test_only_assistant_turns_and_their_end_marker_are_learned(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Russia?"},
                {"role": "assistant", "content": "Москва."}]
    assert _learned_spans(tok, messages) == ["Paris.<|im_end|>\n", "Москва.<|im_end|>\n"]


def test_loss_on_all_learns_every_token_of_the_rendered_conversation(tiny_model):
    """hyperparameters.lossOn all (Axolotl's train_on_inputs): the system and user turns and the
    template's markup are learned too, as SFT's encoding of the split gives them."""
    from llmfactory_runtime.finetune import encoding

    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    enc = encode_for_training(tok, messages, 512, every_token=True)
    assert enc["labels"] == enc["input_ids"] and tok.decode(enc["input_ids"]).startswith("<|im_start|>system")
    spec = {"objective": "sft", "hyperparameters": {"maxSeqLength": 512, "lossOn": "all"}}
    rows = [{"messages": messages}, {"messages": [{"role": "user", "content": "hello"}]}]
    split = encoding.encode(spec, tok, rows, "train")
    assert [e["labels"] for e in split.examples] == [e["input_ids"] for e in split.examples] and split.units == 2
    assumed = encoding.encode({**spec, "hyperparameters": {"maxSeqLength": 512}}, tok, rows, "train")
    assert assumed.units == 1 and IGNORE in assumed.examples[0]["labels"]  # unset: the answers only


def test_user_only_conversation_learns_nothing(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert _learned_spans(tok, [{"role": "user", "content": "hello"}]) == []


def test_truncation_keeps_mask_aligned(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the sea is wide " * 20}]
    full = encode_for_training(tok, messages, 10_000)
    enc = encode_for_training(tok, messages, 40)
    assert len(enc["input_ids"]) == len(enc["labels"]) == 40
    assert enc["input_ids"] == full["input_ids"][:40] and enc["labels"] == full["labels"][:40]
    assert enc["labels"][-1] == enc["input_ids"][-1]  # the cut falls inside the answer


def test_a_base_tokenizer_gets_chatml_with_its_markers_as_tokens_and_the_model_rows_for_them(tiny_model, tmp_path):
    """A base model's tokenizer has no template: ChatML, whose markers become one token each (the
    end of an answer is then a token to learn and to stop on), and the model grows a row for each,
    the mean of its trained rows. A tokenizer with the markers, or with a template, is left as it is."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmfactory_runtime.generate import stop_token_ids
    from llmfactory_runtime.models import load_model, load_tokenizer
    from tests.tiny_model import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", tokenizer="sentencepiece", chat_template=False)
    tok = load_tokenizer({"uri": f"file://{base}"})
    assert len(tok) == 658 and tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [656, 657]
    assert stop_token_ids(tok) == [2, 657]  # </s> and <|im_end|>
    assert _learned_spans(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]) \
        == ["Hello.<|im_end|> \n"]  # SentencePiece's "▁" before the newline, as Mistral's tokenizer writes it
    model = load_model({"uri": f"file://{base}"})
    original = AutoModelForCausalLM.from_pretrained(base)
    for grown, trained in ((model.get_input_embeddings(), original.get_input_embeddings()),
                           (model.get_output_embeddings(), original.get_output_embeddings())):
        assert grown.weight.shape[0] == 658 and torch.equal(grown.weight[:656], trained.weight)
        assert torch.allclose(grown.weight[656:], trained.weight.mean(dim=0).expand(2, -1))
    assert len(load_tokenizer({"uri": f"file://{tiny_model}"})) == len(AutoTokenizer.from_pretrained(tiny_model))


# Gemma's template, in short: its turns end on <end_of_turn>, not on the tokenizer's end-of-sequence.
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                  "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
                  " + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def test_generation_stops_on_the_end_of_turn_each_template_writes(tmp_path):
    """Gemma's turns end on <end_of_turn>, Llama 3's on <|eot_id|>, ChatML's on <|im_end|>: each is
    a stop token beside end-of-sequence (it was only ChatML's before), and what the model learns to
    say after an answer."""
    from llmfactory_runtime.chat import TEMPLATES, marker_ids, use_template
    from llmfactory_runtime.generate import stop_token_ids
    from tests.tiny_model import make_tokenizer

    answer = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    gemma = make_tokenizer(tmp_path / "gemma", style="sentencepiece", chat_template=False)
    gemma.add_special_tokens({"extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    gemma.chat_template = GEMMA_TEMPLATE
    assert gemma.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [656, 657]
    assert stop_token_ids(gemma) == [2, 657] and marker_ids(gemma) == [1, 656, 657]  # <s> is written too
    assert _learned_spans(gemma, answer) == ["Hello.<end_of_turn> \n"]

    llama3 = make_tokenizer(tmp_path / "llama3", style="llama3", chat_template=False)
    assert use_template(llama3, *TEMPLATES["llama3"]) == [400, 401, 402]  # <|start_header_id|>, <|end_header_id|>, <|eot_id|>
    assert llama3.apply_chat_template([{"role": "system", "content": " Be brief. "}, *answer], tokenize=False) == (
        "<|im_start|>"  # the tokenizer's bos_token (Llama 3's is <|begin_of_text|>)
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>")
    assert stop_token_ids(llama3) == [2, 402]
    assert _learned_spans(llama3, answer) == ["Hello.<|eot_id|>"]

    # A template that writes no special token after an answer stops on end-of-sequence alone.
    plain = make_tokenizer(tmp_path / "plain", chat_template=False)
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert stop_token_ids(plain) == [plain.eos_token_id]


def test_a_template_of_ones_own_gets_its_markers_as_tokens_and_is_learned_and_stopped_on(tiny_model):
    from llmfactory_runtime.chat import check_own_template, end_of_turn, template_of
    from llmfactory_runtime.generate import stop_token_ids
    from llmfactory_runtime.models import tokenizer_for

    tok, added = tokenizer_for({"uri": f"file://{tiny_model}"}, cache=False, template=template_of(OWN_SPEC))
    assert tok.chat_template == OWN_TEMPLATE and len(added) == 3
    assert tok.convert_tokens_to_ids(OWN_SPEC["chatTemplateTokens"]) == added  # one token each, new rows
    check_own_template(tok)
    answer = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert _learned_spans(tok, answer) == ["Hello.<|end|>\n"]
    assert end_of_turn(tok) == added[2] and added[2] in stop_token_ids(tok)

    # A marker left out is ordinary text: no token to stop on.
    plain, _ = tokenizer_for({"uri": f"file://{tiny_model}"}, cache=False,
                             template=template_of({**OWN_SPEC, "chatTemplateTokens": ["<|user|>", "<|assistant|>"]}))
    assert end_of_turn(plain) is None and len(plain.tokenize("<|end|>")) > 1


@pytest.mark.parametrize("template, words", [
    ("{{ messages | length }}" + OWN_TEMPLATE, "prefix by prefix"),  # the count changes every earlier text
    ("{{ messages[0]['content'] | no_such_filter }}", "no_such_filter"),
    ("{{ raise_exception('only user and assistant turns') }}", "only user and assistant turns"),
    ("{% if add_generation_prompt %}{{ raise_exception('no prompt') }}{% endif %}" + OWN_TEMPLATE, "no prompt"),
])
def test_a_template_of_ones_own_that_cannot_locate_answers_is_refused_naming_the_field(tiny_model, template, words):
    from llmfactory_runtime.chat import check_own_template, template_of
    from llmfactory_runtime.models import tokenizer_for
    from llmfactory_runtime.task import InvalidTask

    tok, _ = tokenizer_for({"uri": f"file://{tiny_model}"}, cache=False,
                           template=template_of({**OWN_SPEC, "chatTemplateJinja": template}))
    with pytest.raises(InvalidTask, match=rf"^spec.chatTemplateJinja: .*{words}"):
        check_own_template(tok)



def test_tool_calls_are_learned_as_the_assistant_writes_them_and_tool_results_are_not(tiny_model):
    """OpenAI's function-calling rows ({messages with tool_calls and tool results, tools}): ChatML writes
    the tools in the system turn and each call as Qwen2.5 and Hermes do (what vLLM's hermes tool parser
    reads back); the model learns its calls and answers, not the tools' signatures or results."""
    from llmfactory_runtime.data import messages_of, tools_of

    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages, tools = messages_of(TOOL_ROW), tools_of(TOOL_ROW)
    text = render(tok, messages, tools=tools)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n") and '"name": "get_weather"' in text
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n" in text
    assert _learned_spans(tok, messages, 4096, tools=tools) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
        "18 C and sunny.<|im_end|>\n"]
    # Without tools or tool calls the template is plain ChatML, as before.
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert render(tok, plain) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"


def test_an_answer_of_weight_0_is_not_learned(tiny_model):
    """OpenAI's per-message weight: a bad earlier answer kept as context, not taught."""
    from llmfactory_runtime.data import messages_of

    tok = AutoTokenizer.from_pretrained(tiny_model)
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5.", "weight": 0},
                        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "4, sorry."}]}
    assert _learned_spans(tok, messages_of(row)) == ["4, sorry.<|im_end|>\n"]


def test_a_roles_other_names_are_read_as_the_role_and_a_malformed_conversation_names_its_row(tiny_model):
    """ShareGPT's human and gpt in a messages row, OpenAI's developer (its newer system) and a ShareGPT row
    that says user and assistant train as the same conversation; a turn without its text fails the run
    naming the row (a KeyError's traceback before)."""
    from llmfactory_runtime.batching import encode_rows
    from llmfactory_runtime.data import messages_of
    from llmfactory_runtime.task import InvalidTask

    canonical = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello."}]
    rows = [{"messages": [{"role": "developer", "content": "Be brief."}, {"role": "human", "content": "Hi"},
                          {"role": "gpt", "content": "Hello."}]},
            {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Hi"},
                               {"from": "assistant", "value": "Hello."}]}]
    assert [messages_of(row) for row in rows] == [canonical, canonical]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert _learned_spans(tok, messages_of(rows[0])) == ["Hello.<|im_end|>\n"]
    malformed = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]}
    with pytest.raises(InvalidTask, match=r"train.jsonl row 3: a row's conversations are a list of \{from, value\}"):
        encode_rows(tok, [*rows, malformed], 64, where="train.jsonl")


def test_alpaca_and_prompt_completion_rows_train_as_a_conversation_of_one_turn(tiny_model, tmp_path):
    """Axolotl's alpaca type (and Dolly's rows, their input in context, the answer in response) and TRL's
    prompt-completion rows (OpenAI's legacy format), given to a FineTune or a Benchmark as they are: the
    answer learned, the instruction (and its input) the prompt. Before, an alpaca row failed as a
    preference pair without chosen and rejected, a prompt-completion row as an unpaired one without its
    label; a DatasetBuild's teacher was asked a Dolly instruction without its context."""
    from llmfactory_runtime.batching import encode_rows
    from llmfactory_runtime.data import messages_of
    from llmfactory_runtime.dataset.sources import Drops, collect

    tok = AutoTokenizer.from_pretrained(tiny_model)
    conversation = {"messages": [{"role": "user", "content": "Translate to English.\n\nhola"},
                                 {"role": "assistant", "content": "hello"}]}
    rows = [{"instruction": "Translate to English.", "input": "hola", "output": "hello"},
            {"instruction": "Translate to English.", "context": "hola", "response": "hello", "category": "x"},  # Dolly's
            {"prompt": "Translate to English.\n\nhola", "completion": "hello"},
            {"prompt": conversation["messages"][:1], "completion": conversation["messages"][1:]}]
    [expected, *encoded] = encode_rows(tok, [conversation, *rows], 64, where="train.jsonl")
    assert encoded == [expected] * 4
    assert _learned_spans(tok, conversation["messages"]) == ["hello<|im_end|>\n"]
    # Axolotl's alpaca_w_system: the row's system message goes first, for a FineTune and a DatasetBuild alike.
    with_system = {**rows[0], "system": "Be brief."}
    assert messages_of(with_system) == [{"role": "system", "content": "Be brief."}, *conversation["messages"]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in (with_system, rows[1])))
    assert [(p["system"], p["turns"], p["answers"]) for p in collect([{"uri": f"file://{tmp_path}/rows.jsonl"}],
                                                                     Drops(), with_answers=True)] == [
        ("Be brief.", ["Translate to English.\n\nhola"], ["hello"]), (None, ["Translate to English.\n\nhola"], ["hello"])]


def test_openai_content_parts_are_read_as_their_text(tiny_model, tmp_path):
    """OpenAI's chat format allows a message's content as an array of parts: a text-only template
    would write the list's Python form into the training text; the DatasetBuild's reader dropped the rows."""
    from llmfactory_runtime.batching import encode_rows
    from llmfactory_runtime.data import messages_of
    from llmfactory_runtime.dataset.sources import Drops, collect
    from llmfactory_runtime.task import InvalidTask

    tok = AutoTokenizer.from_pretrained(tiny_model)
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
                        {"role": "assistant", "content": [{"type": "output_text", "text": "4."}]}]}  # Responses API
    assert messages_of(row) == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    assert _learned_spans(tok, messages_of(row)) == ["4.<|im_end|>\n"]
    assert "type" not in render(tok, messages_of(row))
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    drops = Drops()
    [prompt] = collect([{"uri": f"file://{tmp_path}/rows.jsonl"}], drops, None, with_answers=True)
    assert (prompt["turns"], prompt["answers"], drops.counts) == (["What is 2+2?"], ["4."], {})
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with pytest.raises(InvalidTask, match=r"train.jsonl row 1: a message's content parts are text .* got .*image_url"):
        encode_rows(tok, [{"messages": [{"role": "user", "content": [image]}, row["messages"][1]]}], 64,
                    where="train.jsonl")


@pytest.mark.parametrize("message,error", [
    ({"role": "user", "content": "Hi", "weight": 0}, "on assistant messages only"),
    ({"role": "assistant", "content": "Hi", "weight": 0.5}, "a message's weight is 0 (not learned) or 1"),
    ({"role": "user", "content": "Hi", "tool_calls": []}, "only assistant messages make tool calls"),
    ({"role": "user", "content": [{"type": {"text": "Hi"}}]}, "a message's content parts are text"),
    ({"role": "user", "content": "Hi", "reasoning_content": "Hm."}, "a message's reasoning is text, on assistant messages only"),
    ({"role": "bot", "content": "Hi"}, "a message's role is one of system, developer, user, human, assistant, gpt, "
                                       "tool, function, got 'bot'"),
    ({"content": "Hi"}, "a row's messages are a list of {role, content} messages"),
    ({"role": ["user"], "content": "Hi"}, "a message's role is one of system"),
    ({"role": "assistant", "content": "Hi", "tool_calls": "get_weather"}, "a message's tool_calls are a list of calls"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
     "a tool call is {type: function, function: {name, arguments}}"),
])
def test_a_malformed_message_is_an_invalid_task_naming_the_row(tiny_model, message, error):
    from llmfactory_runtime.batching import encode_rows
    from llmfactory_runtime.task import InvalidTask

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [message, {"role": "assistant", "content": "Hello."}]}]
    with pytest.raises(InvalidTask, match=f"train.jsonl row 2: .*{re.escape(error)}"):
        encode_rows(tok, rows, 64, where="train.jsonl")
    for tools in ([{"type": "function"}], [{"type": "function", "function": ["f"]}]):
        with pytest.raises(InvalidTask, match=r"row 1: a row's tools are \[\{type: function"):
            encode_rows(tok, [{**rows[0], "tools": tools}], 64, where="train.jsonl")


def _trains_as_the_tool_row(tok, row, tmp_path) -> None:
    """The row trains as TOOL_ROW (OpenAI's tool calling), which it says the same as: the same tools, text
    and labels; a DatasetBuild without a teacher keeps it whole."""
    from llmfactory_runtime.data import messages_of, tools_of
    from llmfactory_runtime.dataset.sources import Drops, collect

    assert tools_of(row) == tools_of(TOOL_ROW)
    assert render(tok, messages_of(row), tools=tools_of(row)) == \
        render(tok, messages_of(TOOL_ROW), tools=tools_of(TOOL_ROW))
    assert _learned_spans(tok, messages_of(row), 4096, tools=tools_of(row)) == \
        _learned_spans(tok, messages_of(TOOL_ROW), 4096, tools=tools_of(TOOL_ROW))
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    [kept] = collect([{"uri": f"file://{tmp_path}/rows.jsonl"}], Drops(), None, with_answers=True, whole_tools=True)
    assert kept["whole"]["messages"] == messages_of(row)


def test_openai_legacy_function_calling_rows_train_as_tool_calling_rows(tiny_model, tmp_path):
    """OpenAI's function calling before tools (2023): the row's functions, an assistant's function_call,
    the result in a message of role function."""
    system, user, call, result, answer = TOOL_ROW["messages"]
    legacy = {"functions": [tool["function"] for tool in TOOL_ROW["tools"]], "messages": [
        system, user, {"role": "assistant", "content": None, "function_call": call["tool_calls"][0]["function"]},
        {"role": "function", "name": "get_weather", "content": result["content"]}, answer]}
    _trains_as_the_tool_row(AutoTokenizer.from_pretrained(tiny_model), legacy, tmp_path)


def test_llama_factory_sharegpt_tool_rows_train_as_tool_calling_rows(tiny_model, tmp_path):
    """LLaMA-Factory's ShareGPT function calling: function_call turns (the call as JSON, its arguments an
    object) and observation turns, the tools a JSON list of the functions alone."""
    from llmfactory_runtime.batching import encode_rows
    from llmfactory_runtime.task import InvalidTask

    system, user, call, result, answer = TOOL_ROW["messages"]
    function = call["tool_calls"][0]["function"]
    row = {"tools": json.dumps([tool["function"] for tool in TOOL_ROW["tools"]]), "conversations": [
        {"from": "system", "value": system["content"]}, {"from": "human", "value": user["content"]},
        {"from": "function_call", "value": json.dumps({"name": function["name"],
                                                        "arguments": json.loads(function["arguments"])})},
        {"from": "observation", "value": result["content"]}, {"from": "gpt", "value": answer["content"]}]}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    _trains_as_the_tool_row(tok, row, tmp_path)
    broken = {**row, "conversations": [*row["conversations"][:2], {"from": "function_call", "value": "get_weather"}]}
    with pytest.raises(InvalidTask, match="row 1: a function_call turn's value is its call as JSON"):
        encode_rows(tok, [broken], 64, where="train.jsonl")


def test_glaive_function_calling_rows_train_as_tool_calling_rows_and_plain_ones_as_conversations(tiny_model, tmp_path):
    """glaive-function-calling-v2's rows: the functions as JSON after the system's words, the turns one
    text, a call after <functioncall> with its arguments in single quotes. A build with a teacher asks the
    plain rows' turns and drops the calling ones (it would lose the calls); a call that is not one fails
    naming the row."""
    from llmfactory_runtime.batching import encode_rows
    from llmfactory_runtime.dataset.sources import Drops, collect
    from llmfactory_runtime.task import InvalidTask

    system, user, call, result, answer = TOOL_ROW["messages"]
    function = call["tool_calls"][0]["function"]
    row = {"system": f"SYSTEM: {system['content']} -\n" + "\n\n".join(
               json.dumps(tool["function"], indent=4) for tool in TOOL_ROW["tools"]) + "\n",
           "chat": f"USER: {user['content']}\n\n\nASSISTANT: <functioncall> {{\"name\": \"{function['name']}\", "
                   f"\"arguments\": '{function['arguments']}'}} <|endoftext|>\n\n\nFUNCTION RESPONSE: "
                   f"{result['content']}\n\n\nASSISTANT: {answer['content']} <|endoftext|>\n\n\n"}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    _trains_as_the_tool_row(tok, row, tmp_path)
    plain = {"system": "SYSTEM: You are a helpful assistant, with no access to external functions.",
             "chat": "USER: Two jokes?\n\n\nASSISTANT: One. <|endoftext|>\n\n\nUSER: Another?\n\n\n"
                     "ASSISTANT: Two. <|endoftext|>\n\n\n"}
    # Offered the functions, it calls none: a teacher, not shown them, would answer another question.
    uncalled = {**row, "chat": "USER: Hi\n\n\nASSISTANT: Hello! <|endoftext|>\n\n\n"}
    (tmp_path / "glaive.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (row, plain, uncalled)))
    drops = Drops()
    [asked] = collect([{"uri": f"file://{tmp_path}/glaive.jsonl"}], drops)
    assert asked["system"] == "You are a helpful assistant, with no access to external functions."
    assert asked["turns"] == ["Two jokes?", "Another?"] and asked["answers"] == ["One.", "Two."]
    assert drops.counts == {"tool_calls": 2}
    broken = {**row, "chat": row["chat"].replace(f'{{"name": "{function["name"]}"', "get_weather(")}
    with pytest.raises(InvalidTask, match="row 1: a glaive call is <functioncall>"):
        encode_rows(tok, [broken], 64, where="train.jsonl")


def test_hermes_function_calling_rows_train_as_tool_calling_rows_with_json_calls(tiny_model, tmp_path):
    """hermes-function-calling-v1's ShareGPT rows: the functions in the system turn between <tools> and
    </tools>, the calls in <tool_call> blocks and the results in <tool_response> blocks, as Python
    literals. Read as text, the model would learn calls in single quotes that no JSON parser reads back
    (and the results' tags twice); they train as the OpenAI row they say the same as."""
    from llmfactory_runtime.batching import encode_rows
    from llmfactory_runtime.data import messages_of, tools_of
    from llmfactory_runtime.dataset.sources import Drops, collect
    from llmfactory_runtime.task import InvalidTask

    system, user, call, result, answer = TOOL_ROW["messages"]
    row = {"id": "h1", "category": "Weather", "conversations": [
        {"from": "system", "value": f"{system['content']} <tools>\n{[tool for tool in TOOL_ROW['tools']]!r}\n</tools> "
                                    "For each function call return a json object with function name and arguments "
                                    "within <tool_call> </tool_call> tags with the following schema:\n<tool_call>\n"
                                    "{'arguments': <args-dict>, 'name': <function-name>}\n</tool_call>\n"},
        {"from": "human", "value": user["content"]},
        {"from": "gpt", "value": "<tool_call>\n{'arguments': {'city': 'Paris'}, 'name': 'get_weather'}\n</tool_call>"},
        {"from": "tool", "value": f"<tool_response>\n{result['content']}\n</tool_response>"},
        {"from": "gpt", "value": answer["content"]}]}
    assert "'get_weather'" in row["conversations"][0]["value"]  # the tools as Python writes them
    tok = AutoTokenizer.from_pretrained(tiny_model)
    _trains_as_the_tool_row(tok, row, tmp_path)
    drops = Drops()  # a teacher's build, answering turn by turn in plain text, would lose the calls
    assert list(collect([{"uri": f"file://{tmp_path}/rows.jsonl"}], drops)) == [] and drops.counts == {"tool_calls": 1}
    # Two calls in one turn, and results written as Python literals: two tool messages, each JSON.
    turns = row["conversations"]
    both = {"conversations": [*turns[:2], {"from": "gpt", "value": turns[2]["value"] + "\n" + turns[2]["value"].replace(
        "Paris", "Oslo")}, {"from": "tool", "value": "<tool_response>\n{'name': 'get_weather', 'content': {'c': 18, "
                                                     "'sunny': True}}\n</tool_response>\n<tool_response>\nnone\n"
                                                     "</tool_response>"}, turns[4]]}
    read = messages_of(both)
    assert [c["function"]["arguments"] for c in read[2]["tool_calls"]] == ['{"city": "Paris"}', '{"city": "Oslo"}']
    assert [m["content"] for m in read[3:5]] == ['{"name": "get_weather", "content": {"c": 18, "sunny": true}}', "none"]
    for value, error in (("<tool_call>\nget_weather(city='Paris')\n</tool_call>",
                          "a Hermes <tool_call> is JSON or a Python literal, got \"get_weather(city='Paris')\""),
                         ("<tool_call>\n{'arguments': {'city': 'Paris'}}\n</tool_call>",
                          "a tool call is {type: function, function: {name, arguments}}")):
        broken = {"conversations": [*turns[:2], {"from": "gpt", "value": value}]}
        with pytest.raises(InvalidTask, match=re.escape(f"row 1: {error}")):
            encode_rows(tok, [broken], 64, where="train.jsonl")
    # Without <tools> offered, the tags are words: an answer that teaches the format stays text.
    prose = [{"from": "human", "value": "How does Hermes call?"}, {"from": "gpt", "value": "<tool_call>{name}</tool_call>"}]
    assert messages_of({"conversations": prose})[1] == {"role": "assistant", "content": prose[1]["value"]}
    # Hermes' own system prompt names the tags before its block ("within <tools> </tools> XML tags").
    hermes_prompt = ("You are a function calling AI model. You are provided with function signatures within <tools> "
                     "</tools> XML tags. You may call one or more functions to assist with the user query.")
    own = {"conversations": [{**turns[0], "value": turns[0]["value"].replace(system["content"], hermes_prompt)},
                             *turns[1:]]}
    assert tools_of(own) == tools_of(TOOL_ROW) and messages_of(own)[0] == {"role": "system", "content": hermes_prompt}


def test_xlam_rows_train_as_the_query_and_its_tool_calls_with_json_schema_tools(tiny_model, tmp_path):
    """Salesforce's xlam-function-calling-60k: {query, tools, answers}, the tools and answers JSON text,
    a tool's parameters {name: {type, description, default}} in Python's type names. They train as the
    OpenAI row of the query and its calls, the tools with JSON Schema parameters (what vLLM and OpenAI
    show a model); a build without a teacher keeps them whole, one with a teacher drops them, and one that
    reads the query as a prompt column asks it."""
    from llmfactory_runtime.batching import encode_rows
    from llmfactory_runtime.data import messages_of, tools_of
    from llmfactory_runtime.dataset.sources import Drops, collect
    from llmfactory_runtime.task import InvalidTask

    _, user, call, _, _ = TOOL_ROW["messages"]
    function = call["tool_calls"][0]["function"]
    tool = WEATHER[0]["function"]
    row = {"id": 7, "query": user["content"], "answers": json.dumps([{"name": function["name"], "arguments": {"city": "Paris"}}]),
           "tools": json.dumps([{"name": tool["name"], "description": tool["description"],
                                 "parameters": {"city": {"type": "str"}}}])}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tools_of(row) == WEATHER
    assert messages_of(row) == [user, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": function}]}]
    assert _learned_spans(tok, messages_of(row), 4096, tools=tools_of(row)) == \
        ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n']
    # Python's type names as JSON Schema's; optional where the type says so or a default is given.
    typed = {**row, "tools": [{"name": "top_k", "parameters": {
        "nums": {"description": "The numbers.", "type": "List[int]"}, "k": {"type": "int, optional"},
        "order": {"type": "str", "default": "desc"}, "key": {"type": "Callable"}, "pairs": {"type": "Dict[str, Any]"}}}]}
    assert tools_of(typed)[0]["function"]["parameters"] == {"type": "object", "required": ["nums", "key", "pairs"], "properties": {
        "nums": {"type": "array", "items": {"type": "integer"}, "description": "The numbers."}, "k": {"type": "integer"},
        "order": {"type": "string", "default": "desc"}, "key": {}, "pairs": {"type": "object"}}}
    (tmp_path / "xlam.jsonl").write_text(json.dumps(row) + "\n")
    [kept] = collect([{"uri": f"file://{tmp_path}/xlam.jsonl"}], Drops(), None, with_answers=True, whole_tools=True)
    assert kept["whole"] == {"messages": messages_of(row), "tools": WEATHER} and kept["turns"] == [user["content"]]
    drops = Drops()
    assert list(collect([{"uri": f"file://{tmp_path}/xlam.jsonl", "fields": "xlam"}], drops)) == []
    assert drops.counts == {"tool_calls": 1}
    [asked] = collect([{"uri": f"file://{tmp_path}/xlam.jsonl", "fields": "prompt", "promptField": "query"}], Drops())
    assert asked["turns"] == [user["content"]]
    for answers, error in (("[]", "an xlam row's answers are the calls that answer its query, got none"),
                           ("get_weather(city='Paris')", "an xlam row's answers are a JSON list of {name, arguments}")):
        with pytest.raises(InvalidTask, match=re.escape(f"row 1: {error}")):
            encode_rows(tok, [{**row, "answers": answers}], 64, where="train.jsonl")


def test_a_conversation_rows_system_column_is_its_system_message(tiny_model):
    """LLaMA-Factory's ShareGPT (and OpenAI) rows keep their system message in a system column: it comes
    first, unless the conversation has its own; a DatasetBuild's teacher is given it too."""
    from llmfactory_runtime.data import messages_of
    from llmfactory_runtime.dataset.sources import _prompt

    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    row = {"system": "Answer as a pirate.", "conversations": turns}
    assert messages_of(row) == [{"role": "system", "content": "Answer as a pirate."},
                                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert messages_of({**row, "conversations": [{"from": "system", "value": "Be brief."}, *turns]})[0]["content"] == \
        "Be brief."
    assert messages_of({**row, "system": ""}) == messages_of({"conversations": turns})
    assert _prompt(row, {}, "en")["system"] == "Answer as a pirate."
    openai = {"system": "Answer as a pirate.", "messages": [{"role": "user", "content": "Hi"}]}
    assert messages_of(openai)[0] == {"role": "system", "content": "Answer as a pirate."}
    with pytest.raises(ValueError, match="a row's system is text, got"):
        messages_of({**row, "system": ["Be brief."]})


def test_an_answers_reasoning_is_learned_where_the_template_writes_it_or_in_think_tags(tiny_model):
    """Rows that keep an assistant's reasoning apart from its answer (vLLM's, DeepSeek's and Qwen3's
    reasoning_content, gpt-oss' thinking, OpenRouter's reasoning): a template that reads it (Qwen3's,
    gpt-oss') is given it; one that does not (ChatML here, Llama 3's) gets it in <think> tags before the
    answer, as DeepSeek-R1's distilled models write it. Either way it is learned with the answer; a template
    that drops it is refused."""
    from llmfactory_runtime.chat import use_template
    from llmfactory_runtime.data import messages_of
    from llmfactory_runtime.task import InvalidTask

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for field in ("reasoning_content", "reasoning", "thinking"):
        row = {"messages": [{"role": "user", "content": "2+2?"},
                            {"role": "assistant", "content": "4", field: " Two and two make four. "}]}
        assert messages_of(row)[1] == {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}
        assert _learned_spans(tok, messages_of(row)) == ["<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>\n"]
    # gpt-oss' template reads `thinking`, Qwen3's `reasoning_content`: either is given it, once.
    for field in ("thinking", "reasoning_content"):
        use_template(tok, "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m." + field + " %}[{{ m." + field +
                     " }}] {% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", ("<|im_start|>", "<|im_end|>"))
        assert _learned_spans(tok, messages_of(row)) == ["[Two and two make four.] 4<|im_end|>\n"]
    # DeepSeek-R1's distilled models' template drops what comes before </think>: refused, not lost.
    use_template(tok, "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
                 ("<|im_start|>", "<|im_end|>"))
    with pytest.raises(InvalidTask, match="the chat template drops the reasoning the data holds"):
        _learned_spans(tok, messages_of(row))


def test_a_models_chat_template_kwargs_render_every_conversation_and_are_never_saved(tiny_model, tmp_path):
    """A Benchmark's model under test with chatTemplateKwargs {enable_thinking: false} (Qwen3 answering
    without reasoning): every prompt of it is rendered so, by transformers and by vLLM's server (sent
    as its chat_template_kwargs); the tokenizer saved from it renders as the template does alone."""
    from llmfactory_runtime.models import tokenizer_for
    from llmfactory_runtime.vllm_server import VllmServer

    import shutil

    qwen3_like(tiny_model, tmp_path / "qwen3-like")
    question = [{"role": "user", "content": "2+2?"}]
    source = {"uri": f"file://{tmp_path}/qwen3-like", "chatTemplateKwargs": {"enable_thinking": False}}
    for model in (source, {**source, "adapterUri": f"file://{tmp_path}/qwen3-like"}):
        tok, _ = tokenizer_for(model, cache=False)
        assert render(tok, question, add_generation_prompt=True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert VllmServer(model).request_params["chat_template_kwargs"] == {"enable_thinking": False}
    shutil.copytree(tiny_model, tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    plain, _ = tokenizer_for({"uri": f"file://{tmp_path}/saved"}, cache=False)
    assert render(plain, question, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert "chat_template_kwargs" not in VllmServer({"uri": f"file://{tmp_path}/saved"}).request_params
    # A GGUF model dequantized once is the same weights however its template is rendered.
    from llmfactory_runtime.models import _gguf_cache

    from finetune_helpers import SMOLLM2
    assert _gguf_cache({**SMOLLM2, "chatTemplateKwargs": {"enable_thinking": False}}, True) == _gguf_cache(SMOLLM2, True)


def test_a_fine_tunes_chat_template_kwargs_render_its_data_in_every_tokenizing_process(tiny_model, tmp_path, monkeypatch):
    """baseModel.chatTemplateKwargs {enable_thinking: false}: Qwen3's empty <think> block is the prompt's
    (as when Qwen3 answers without reasoning), not learned; the worker processes that tokenize a split
    render as the training process does, and the node's token files are told apart from another
    rendering's."""
    from llmfactory_runtime import cpus
    from llmfactory_runtime.batching import encoded
    from llmfactory_runtime.chat import set_template_kwargs
    from llmfactory_runtime.finetune import token_files

    tok = qwen3_like(tiny_model)
    before = token_files.fingerprint(tok)
    set_template_kwargs(tok, {"enable_thinking": False})
    assert token_files.fingerprint(tok) != before
    rows = [{"messages": [{"role": "user", "content": f"{n}+{n}?"}, {"role": "assistant", "content": str(2 * n)}]}
            for n in range(12)]
    [first, *_] = in_memory = list(encoded(tok, rows, 64))
    assert tok.decode([t for t, label in zip(first["input_ids"], first["labels"]) if label != IGNORE]) == "0<|im_end|>\n"
    monkeypatch.setattr(token_files, "PIECE", 4)
    monkeypatch.setattr(cpus, "available", lambda cgroup=cpus.CGROUP: 2)
    by_workers = list(token_files.encoded_by_workers(tok, rows, 64, False, "train.jsonl"))
    assert [e["labels"].tolist() for e in by_workers] == [e["labels"] for e in in_memory]


def _examples(tok, rows: list[dict], every_token: bool = False) -> list[tuple[str, list[str]]]:
    """An sft split's examples as training reads them: each example's text and its learned runs."""
    from llmfactory_runtime.finetune import encoding

    split = encoding.encode({"objective": "sft", "hyperparameters": {"maxSeqLength": 512,
                                                                      "lossOn": "all" if every_token else "assistant"}},
                            tok, rows, "train")
    out = []
    for e in split.examples:
        runs, run = [], []
        for token, label in zip(e["input_ids"] + [None], e["labels"] + [IGNORE]):
            if label != IGNORE:
                run.append(token)
            elif run:
                runs, run = [*runs, tok.decode(run)], []
        out.append((tok.decode(e["input_ids"]), runs))
    return out, split.by_answer


def _read_as_finetune(tok, rows: list[dict], tmp_path, caplog) -> list[list[int]]:
    """The examples' ids of an sft split as a FineTune reads it (the token files of a node)."""
    import contextlib

    import torch

    from llmfactory_runtime.data import dumps_jsonl
    from llmfactory_runtime.finetune import encoding
    from llmfactory_runtime.finetune.distributed import World

    (tmp_path / "train.jsonl").write_bytes(dumps_jsonl(rows))
    caplog.set_level("INFO", logger=encoding.__name__)
    with contextlib.ExitStack() as running:
        split = encoding.read({"objective": "sft", "hyperparameters": {"maxSeqLength": 512}}, tok, f"file://{tmp_path}",
                              "train", World(rank=0, size=1, local_rank=0, device=torch.device("cpu")), "run", running)
        return [e["input_ids"].tolist() for e in split.examples]


def test_a_template_that_writes_earlier_answers_otherwise_learns_each_answer_after_the_conversation_before_it(
        tiny_model, tmp_path, caplog):
    """Qwen3's template writes an answer's reasoning only after the last question: rendered whole, a
    conversation's first answer has none, though the model wrote one. Such a conversation (it was refused
    as not "prefix by prefix", reasoning or not) is learned answer by answer: each answer after the
    conversation before it as the template writes it then, which is what the model reads and writes
    when it answers that turn."""
    tok = qwen3_like(tiny_model)
    q1, q2 = "<|im_start|>user\n2+2?<|im_end|>\n", "<|im_start|>user\n3+3?<|im_end|>\n"
    reasoned = {"messages": [{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
                             {"role": "user", "content": "3+3?"},
                             {"role": "assistant", "content": "<think>three and three</think>6"}]}  # inline, as OpenR1's
    examples, by_answer = _examples(tok, [reasoned])
    first, second = "<|im_start|>assistant\n<think>\ntwo and two\n</think>\n\n4<|im_end|>\n", \
        "<|im_start|>assistant\n<think>\nthree and three\n</think>\n\n6<|im_end|>\n"
    assert examples == [(q1 + first, [first[len("<|im_start|>assistant\n"):]]),
                        (q1 + "<|im_start|>assistant\n4<|im_end|>\n" + q2 + second, [second[len("<|im_start|>assistant\n"):]])]
    assert by_answer == 1
    # As a FineTune reads it (a node's token files), saying so.
    assert _read_as_finetune(tok, [reasoned, reasoned], tmp_path, caplog) == [
        tok.encode(text, add_special_tokens=False) for text, _ in examples * 2]
    assert "train.jsonl: 2 conversations learned answer by answer" in caplog.text
    # Without reasoning, each answer is learned with the empty block the template writes; an answer of
    # weight 0 is only what the next one reads; a one-turn conversation is one example, as always.
    plain = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "weight": 0},
                          {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}
    one_turn = {"messages": [plain["messages"][0], {"role": "assistant", "content": "4"}]}
    examples, by_answer = _examples(tok, [plain, one_turn, {"messages": plain["messages"][:3]}])
    assert examples == [
        (q1 + "<|im_start|>assistant\n4<|im_end|>\n" + q2 + "<|im_start|>assistant\n<think>\n\n</think>\n\n6<|im_end|>\n",
         ["<think>\n\n</think>\n\n6<|im_end|>\n"]),
        (q1 + "<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n", ["<think>\n\n</think>\n\n4<|im_end|>\n"])]
    assert by_answer == 0
    # Every token learned (lossOn all): the conversation once, as the template writes it.
    examples, by_answer = _examples(tok, [reasoned], every_token=True)
    assert [text for text, _ in examples] == [q1 + "<|im_start|>assistant\n4<|im_end|>\n" + q2 + second]
    assert by_answer == 0


def test_perplexity_under_such_a_template_counts_each_answer_once_and_each_conversation_once(tiny_model):
    """A Benchmark's perplexity of a conversation learned answer by answer: over answers, each answer
    read after the conversation before it, as it was learned; over every token, the conversation once
    as the template writes it, not its history again for each answer."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from llmfactory_runtime.batching import perplexity

    tok, model = qwen3_like(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model)

    def losses(prefix: str, text: str) -> list[float]:
        """The next-token losses of text's tokens after prefix's (all of them where prefix is empty)."""
        ids = tok(prefix + text, add_special_tokens=False)["input_ids"]
        start = max(1, len(tok(prefix, add_special_tokens=False)["input_ids"]))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        return [-float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids))]

    q1, q2 = "<|im_start|>user\n2+2?<|im_end|>\n", "<|im_start|>user\n3+3?<|im_end|>\n"
    opened, block = "<|im_start|>assistant\n", "<think>\n\n</think>\n\n"
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}
    answers = losses(q1 + opened, block + "4<|im_end|>\n") + \
        losses(q1 + opened + "4<|im_end|>\n" + q2 + opened, block + "6<|im_end|>\n")
    every = losses("", render(tok, row["messages"]))
    assert render(tok, row["messages"]) == q1 + opened + "4<|im_end|>\n" + q2 + opened + block + "6<|im_end|>\n"
    measured = perplexity(model, tok, [row])
    assert measured["assistant"] == pytest.approx(math.exp(sum(answers) / len(answers)), rel=1e-4)
    assert measured["all"] == pytest.approx(math.exp(sum(every) / len(every)), rel=1e-4)


def test_a_template_that_drops_inline_reasoning_or_writes_answers_elsewhere_is_refused(tiny_model):
    """Reasoning inline in an answer (`<think>...</think>` before it, OpenR1's and OpenThoughts' rows)
    under a template that strips it (DeepSeek-R1's distilled models'): refused as the reasoning field
    is, not learned as answers alone. A template whose answers do not follow its generation prompt:
    refused naming spec.chatTemplate, not a crash."""
    from llmfactory_runtime.chat import use_template
    from llmfactory_runtime.task import InvalidTask

    tok = AutoTokenizer.from_pretrained(tiny_model)
    inline = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>two and two</think>4"}]
    assert _learned_spans(tok, inline) == ["<think>two and two</think>4<|im_end|>\n"]  # ChatML writes it as it is
    use_template(tok, "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
                 ("<|im_start|>", "<|im_end|>"))
    with pytest.raises(InvalidTask, match="the chat template drops the reasoning the data holds"):
        _learned_spans(tok, inline)
    assert _learned_spans(tok, [inline[0], {"role": "assistant", "content": "<think></think>4"}]) == ["4<|im_end|>\n"]

    use_template(tok, "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}", ("<|im_start|>", "<|im_end|>"))
    with pytest.raises(InvalidTask, match="does not write an answer where its generation prompt ends.*spec.chatTemplate chatml"):
        _examples(tok, [{"messages": [inline[0], {"role": "assistant", "content": "4"}]}])


def test_a_template_that_writes_no_tool_calls_is_refused_before_training(tmp_path):
    """Llama 3's template here (as Axolotl's llama3) has no tools: rows with tool calls would teach the
    model to answer without the calls it should make."""
    from llmfactory_runtime.chat import TEMPLATES, use_template
    from llmfactory_runtime.data import messages_of, tools_of
    from llmfactory_runtime.task import InvalidTask
    from tests.tiny_model import make_tokenizer

    llama3 = make_tokenizer(tmp_path / "llama3", style="llama3", chat_template=False)
    use_template(llama3, *TEMPLATES["llama3"])
    with pytest.raises(InvalidTask, match="the chat template does not write the tools or tool calls the data holds "
                                          r"\(get_weather left out\): a FineTune's spec.chatTemplate chatml"):
        encode_for_training(llama3, messages_of(TOOL_ROW), 512, tools=tools_of(TOOL_ROW))
