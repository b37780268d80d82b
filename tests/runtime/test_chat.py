"""Loss only on the assistant's words: the mask is exact, checked by hand on small cases."""

from transformers import AutoTokenizer

from llmfactory_runtime.chat import IGNORE, encode_for_training


def _learned_spans(tok, messages, max_len=512) -> list[str]:
    """The runs of consecutive learned tokens, decoded together (a Cyrillic letter is two byte tokens)."""
    enc = encode_for_training(tok, messages, max_len)
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
