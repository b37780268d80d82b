"""Raw-text rows ({text}): continued pre-training on documents, as TRL's language-modeling rows,
Axolotl's completion type and torchtune's text_completion_dataset read them."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmfactory_runtime.batching import as_trained, encode_text, perplexity
from llmfactory_runtime.chat import IGNORE, render
from llmfactory_runtime.data import dumps_jsonl
from llmfactory_runtime.finetune import encoding
from llmfactory_runtime.quantize import run as quantize_run
from llmfactory_runtime.store import open_store
from llmfactory_runtime.task import InvalidTask

from finetune_helpers import conversations, finetune_task, loss_curve, run_finetune, write_task
from tiny_model import make_tokenizer

SEA = "The sea is wide and the waves are blue. Sunlight is scattered by the air, blue light the most. "
SPEC = {"objective": "sft", "hyperparameters": {"maxSeqLength": 16}}


@pytest.mark.parametrize("style,bos", [("gpt2", None), ("sentencepiece", "<s>")])
def test_a_document_is_learned_whole_in_pieces_between_the_tokenizers_own_sequence_markers(tmp_path, style, bos):
    make_tokenizer(tmp_path, style=style)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    pieces = encode_text(tok, SEA * 2, 16)
    whole = [t for p in pieces for t in p["input_ids"]]
    assert whole == tok(SEA * 2)["input_ids"] + [tok.eos_token_id]  # nothing cut off, the end marked
    assert (tok.convert_ids_to_tokens(whole[0]) == bos) == (bos is not None)  # BOS only where the tokenizer writes one
    assert len(pieces) == -(-len(whole) // 16) > 1 and all(len(p["input_ids"]) <= 16 for p in pieces)
    assert all(p["labels"] == p["input_ids"] for p in pieces)  # every token learned
    # A last piece of one token predicts nothing: left out.
    ids = tok(SEA)["input_ids"] + [tok.eos_token_id]
    assert [list(p["input_ids"]) for p in encode_text(tok, SEA, len(ids) - 1)] == [ids[:-1]]


def test_text_rows_train_beside_conversations_and_a_row_with_messages_beside_text_is_a_conversation(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    [chat] = conversations(1)
    rows = [{"text": SEA}, chat, {"text": "rendered elsewhere", **chat}]
    split = encoding.encode({**SPEC, "hyperparameters": {"maxSeqLength": 512}}, tok, rows, "train")
    assert split.units == 3 and split.lengths == [len(e["input_ids"]) for e in split.examples]
    text, *chats = split.examples
    assert text["labels"] == text["input_ids"] and tok.decode(text["input_ids"]) == SEA + tok.eos_token
    assert all(IGNORE in c["labels"] and tok.decode(c["input_ids"]).startswith("<|im_start|>user") for c in chats)
    # Pieces of maxSeqLength: one unit each, in the document's order.
    split = encoding.encode(SPEC, tok, [{"text": SEA}], "train")
    assert split.units > 1 and max(split.lengths) == 16
    assert [t for e in split.examples for t in e["input_ids"]] == list(encode_text(tok, SEA, 512)[0]["input_ids"])


@pytest.mark.parametrize("objective,rows,message", [
    ("sft", [{"text": SEA}, {"text": "  "}], "spec.objective sft: train.jsonl row 2: a text row's text must be a "
                                              "non-empty string, got '  '"),
    ("sft", [{"text": ["a list"]}], "row 1: a text row's text must be a non-empty string"),
    ("dpo", [{"text": SEA}], "spec.objective dpo: train.jsonl row 1: a text row .* trains with objective sft only"),
    ("kto", [{"text": SEA}], "spec.objective kto: train.jsonl row 1: a text row .* trains with objective sft only"),
    ("grpo", [{"text": SEA, "answer": "blue"}], "spec.objective grpo: train.jsonl row 1: a text row .* cannot be "
                                                "a preference pair, an unpaired example or a prompt"),
])
def test_a_malformed_or_misplaced_text_row_is_an_invalid_task_naming_file_and_row(tiny_model, objective, rows, message):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    spec = {**SPEC, "objective": objective, "dpo": {"loss": "sigmoid"},
            "grpo": {"grader": {"operation": "equals", "referenceField": "answer"}}}
    with pytest.raises(InvalidTask, match=message):
        encoding.encode(spec, tok, rows, "train")


def test_perplexity_of_raw_text_is_on_every_token_and_quantization_calibrates_on_it_as_written(tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    texts = [{"text": SEA}, {"text": "Море широкое, волны синие."}]
    measured = perplexity(model, tok, texts)
    assert measured["assistant"] == pytest.approx(measured["all"], rel=1e-6) and measured["all"] > 1
    mixed = perplexity(model, tok, texts + conversations(2))
    assert mixed["assistant"] != pytest.approx(mixed["all"])  # the conversations' prompts count in all only
    with pytest.raises(InvalidTask, match="spec.perplexity.dataset: test.jsonl row 1: a text row's text"):
        perplexity(model, tok, [{"text": ""}], where="spec.perplexity.dataset: test.jsonl")
    # Calibration (gptq, awq) reads each row as training did; the importance matrix its words.
    [chat] = conversations(1)
    assert [as_trained(tok, r) for r in (texts[0], chat)] == [SEA, render(tok, chat["messages"])]
    (tmp_path / "train.jsonl").write_bytes(dumps_jsonl([texts[0], chat, texts[1]]))
    rows = quantize_run._calibration({"calibrationSamples": 2}, {"uri": f"file://{tmp_path}"})
    assert rows == [texts[0], chat] and quantize_run._plain_text(rows[0]) == SEA
    assert quantize_run._chat_prompt([texts[0], chat]) == chat["messages"][0]["content"]


@pytest.mark.slow
def test_continued_pretraining_on_documents_learns_them_and_lowers_their_held_out_perplexity(tiny_model, tmp_path):
    """A FineTune whose dataset.uri holds documents longer than maxSeqLength: each is learned in pieces,
    validated on held-out text, and the merged model finds that text likelier than its base did."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    documents = [{"text": SEA * (2 + i % 3)} for i in range(12)]
    (folder / "train.jsonl").write_bytes(dumps_jsonl(documents))
    (folder / "validation.jsonl").write_bytes(dumps_jsonl([{"text": SEA * 2}]))
    task = finetune_task(tiny_model, f"file://{folder}", f"file://{tmp_path}/store",
                         hyperparameters={"maxSeqLength": 32, "epochs": 3})
    done = run_finetune(write_task(task, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = open_store(task["artifactUri"]).read_json("result.json")
    assert result["finalLoss"] < result["firstLoss"] - 0.5 and result["evalLoss"] < result["firstLoss"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    held_out = [{"text": SEA * 2}]
    before = perplexity(AutoModelForCausalLM.from_pretrained(tiny_model), tok, held_out)["all"]
    after = perplexity(AutoModelForCausalLM.from_pretrained(result["modelUri"][7:]), tok, held_out)["all"]
    assert after < before / 2 and math.isclose(math.log(after), result["evalLoss"], rel_tol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # untied output layer; tied to the embeddings
def test_lora_train_embeddings_learns_the_embeddings_and_output_layer_whole(tmp_path, architecture):
    """lora.trainEmbeddings (peft's modules_to_save, Unsloth's continued pre-training): the input
    embeddings and the output layer train whole beside the adapters (one matrix where the model ties
    them, and stays tied), the estimate counts them, the adapter on its base computes what the merged
    model does, and vLLM is told it cannot serve the adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from llmfactory_runtime.vllm_server import adapter_problem
    from tiny_model import make_tiny_llama, make_tiny_qwen2

    base = (make_tiny_llama if architecture == "llama" else make_tiny_qwen2)(tmp_path / "base")
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(dumps_jsonl([{"text": SEA * (1 + i % 3)} for i in range(8)]))
    task = finetune_task(base, f"file://{folder}", f"file://{tmp_path}/store",
                         lora={"r": 4, "trainEmbeddings": True}, hyperparameters={"maxSeqLength": 32, "epochs": 2})
    done = run_finetune(write_task(task, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = open_store(task["artifactUri"]).read_json("result.json")
    assert result["finalLoss"] < result["firstLoss"]
    before = AutoModelForCausalLM.from_pretrained(base)
    merged = AutoModelForCausalLM.from_pretrained(result["modelUri"][7:])
    vocab, hidden = before.get_input_embeddings().weight.shape

    def moved(layer: str) -> set[int]:
        change = getattr(merged, layer)().weight - getattr(before, layer)().weight
        return set((change.abs().amax(-1) > 0).nonzero().flatten().tolist())

    tied = architecture == "qwen2"
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == tied
    tok = AutoTokenizer.from_pretrained(base)
    seen = {t for i in range(3) for piece in encode_text(tok, SEA * (1 + i), 32) for t in piece["input_ids"]}
    # Every row of the output layer learns (the softmax reaches them all); of untied embeddings, the rows
    # of the tokens read, far more than a chat marker's few.
    assert moved("get_output_embeddings") == set(range(vocab))
    if not tied:
        assert len(seen) // 2 < len(moved("get_input_embeddings")) and moved("get_input_embeddings") <= seen
    adapter = result["adapterUri"][7:]
    lora_params = sum(t.numel() for name, t in load_file(f"{adapter}/adapter_model.safetensors").items()
                      if "lora_" in name)
    assert result["estimate"]["trainableParams"] == lora_params + (1 if tied else 2) * vocab * hidden
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(ids).logits
        assert torch.allclose(on_base, merged.eval()(ids).logits, atol=1e-4)
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert "lora.trainEmbeddings" in adapter_problem(config)


@pytest.mark.slow
@pytest.mark.deepspeed("ShareMemCommBuilder")
def test_lora_embedding_learning_rate_steps_the_whole_matrices_at_their_own_rate_alone_and_under_zero2(tmp_path):
    """lora.embeddingLearningRate (Unsloth's embedding_learning_rate): the matrices trainEmbeddings trains
    whole move at their own rate while the adapters learn at theirs, on one process and under DeepSpeed
    ZeRO-2 on two (the same steps: 1 x accumulation 2 vs 2 processes x 1), which shards their optimizer state."""
    from tiny_model import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base")
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(dumps_jsonl([{"text": SEA * (1 + i % 3)} for i in range(8)]))
    rate = 1e-8  # Adam moves a weight by at most ~3x its learning rate a step: these hardly move
    lora = {"r": 4, "dropout": 0.0, "trainEmbeddings": True, "embeddingLearningRate": rate}
    one = finetune_task(base, f"file://{folder}", f"file://{tmp_path}/one", lora=lora,
                        hyperparameters={"maxSeqLength": 32, "epochs": 2, "batchSize": 1, "gradientAccumulation": 2})
    zero2 = finetune_task(base, f"file://{folder}", f"file://{tmp_path}/zero2", lora=lora, resources={"gpusPerNode": 2},
                          hyperparameters={"maxSeqLength": 32, "epochs": 2, "batchSize": 1},
                          distribution={"strategy": "deepspeed", "zeroStage": 2})
    before = AutoModelForCausalLM.from_pretrained(base)
    merged = {}
    for task, processes in ((one, 1), (zero2, 2)):
        done = run_finetune(write_task(task, tmp_path), processes=processes)
        assert done.returncode == 0, done.stderr[-3000:]
        result = open_store(task["artifactUri"]).read_json("result.json")
        assert result["finalLoss"] < result["firstLoss"] - 0.3  # the adapters learn at learningRate 0.01
        merged[processes] = AutoModelForCausalLM.from_pretrained(result["modelUri"][7:])
        for layer in ("get_input_embeddings", "get_output_embeddings"):
            change = (getattr(merged[processes], layer)().weight - getattr(before, layer)().weight).abs().max()
            assert 0 < change <= 3 * rate * result["steps"]
    assert loss_curve(zero2) == pytest.approx(loss_curve(one), abs=1e-4)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(merged[1].eval()(ids).logits, merged[2].eval()(ids).logits, atol=1e-4)
