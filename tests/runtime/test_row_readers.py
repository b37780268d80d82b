"""Every reader of a dataset row says what is wrong with a malformed one as a ValueError, which the
phases turn into an invalid task naming the file and the row: never a KeyError's or TypeError's
traceback, which a Job would retry as a crash."""

import random

from llmfactory_runtime import data

KEYS = ["messages", "conversations", "prompt", "chosen", "rejected", "completion", "label", "input", "preferred_output",
        "non_preferred_output", "text", "tools", "margin", "role", "content", "from", "value", "type", "function",
        "tool_calls", "weight", "name", "arguments", "refusal", "instruction", "output",
        "function_call", "observation", "functions", "from", "value", "system", "chat", "context", "response", "query",
        "answers", "parameters", "default"]
READERS = [data.messages_of, data.preference_of, data.labelled_of, data.prompt_of, data.tools_of, data.text_of,
           data.margin_of]


def _value(rng: random.Random, depth: int = 0):
    """A JSON value of the shapes rows are made of, their field names and roles among its strings."""
    draw = rng.random()
    if depth > 3 or draw < 0.3:
        return rng.choice([None, True, 0, 1, 0.5, "", "x", "user", "assistant", "gpt", "system", "tool", "text", "function_call",
                           "observation", "function", "[1]", '{"name": "f"}', float("nan"),
                           # glaive's texts, whole and broken
                           "SYSTEM: s -\n{\"name\": \"f\"}", "SYSTEM: s -\n{", "USER: a\nASSISTANT: <functioncall> "
                           "{\"name\": \"f\", \"arguments\": '{}'}\nFUNCTION RESPONSE: r", "ASSISTANT: <functioncall> [1]",
                           # xlam's types and JSON texts
                           "List[int]", "str, optional", '[{"name": "f", "arguments": {}}]', '[{"name": "f", "parameters": 1}]',
                           # Hermes' tags around Python literals, whole and broken
                           "s <tools>[{'name': 'f'}]</tools>", "<tools>{'a'", "<tool_call>{'name': 'f', 'arguments': {}}"
                           "</tool_call>", "<tool_call>[1]</tool_call>", "<tool_response>{'a': {1, 2}}</tool_response>",
                           "<tool_response>x"])
    if draw < 0.65:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_a_malformed_row_of_any_shape_is_a_value_error_of_every_reader():
    rng = random.Random(0)
    for _ in range(60_000):  # the first crashes were found within 2,000 rows
        row = {rng.choice(KEYS): _value(rng) for _ in range(rng.randint(1, 4))}
        for read in READERS:
            try:
                read(row)
            except ValueError:
                pass
