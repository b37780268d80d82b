"""Benchmark: perplexity on held-out conversations, an LLM judge's score, lm-evaluation-harness
tasks and a grader's reward of answers to held-out prompts, or how a reward model ranks held-out
preference pairs, with gates."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from .common import (BATCH_SIZE_DESCRIPTION, ENGINE_DESCRIPTION, URI_PATTERN, ApiModel, ApiUsage, Engine, KindInfo,
                     LocalObjectReference, ModelSource, OpenAIEndpoint, RunOptions, StatusBase, TrainedModelSource,
                     pattern)
from .dataset_build import LANGUAGE_PATTERN, HuggingFaceDataset, detectable
from .fine_tune import DatasetInput, Grader


class ModelUnderTest(ApiModel):
    cel_rules: ClassVar = [
        {"rule": "[has(self.fineTuneRef), has(self.quantizationRef), has(self.source)]"
                 ".filter(x, x).size() == 1",
         "message": "set exactly one of fineTuneRef, quantizationRef or source"},
    ]

    fine_tune_ref: LocalObjectReference | None = Field(
        None, description="A FineTune's trained model: its merged model, or its LoRA adapter merged onto its base "
                          "when it kept only the adapter (mergeAdapter: false).")
    quantization_ref: LocalObjectReference | None = Field(
        None, description="A Quantization's first artifact (GGUF file or compressed-tensors folder), loaded back "
                          "through transformers.")
    source: ModelSource | None = Field(None, description="Any model by Hugging Face id or URI.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=(
        "Arguments its chat template is rendered with, wherever this Benchmark renders a conversation for it "
        "(as transformers' apply_chat_template and vLLM's chat_template_kwargs take them): {enable_thinking: "
        "false} has Qwen3 (and SmolLM3, GLM-4.5) answer without reasoning first. spec.model's apply to the "
        "baseline it implies (its FineTune's base); spec.baselineModel has its own; lm-eval's prompts too, with "
        "lmEval.chatTemplate."), json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class Perplexity(ApiModel):
    dataset: DatasetInput | None = Field(
        None, description="Conversations to score (perplexity.value on their assistant tokens, "
                          "perplexity.allTokens on every token), or raw text ({text} rows, every token in both); "
                          "defaults to the FineTune's dataset (a GRPO FineTune's "
                          "prompts hold no answers: name one). Of preference pairs (a DPO FineTune's, or a "
                          "DatasetBuild's with preferences) the prompts and chosen answers "
                          "are scored, and the pairs too: preference.accuracy (share of pairs whose chosen answer "
                          "the model finds likelier per token), and with a baseline preference.baseline and "
                          "preference.rewardAccuracy (share whose chosen answer gained more log-probability over "
                          "the baseline than the rejected one: DPO's implicit reward). Of a KTO FineTune's unpaired "
                          "rows, with a baseline: preference.rewardAccuracy, the share of answers whose "
                          "log-probability change from the baseline lies on its label's side of KTO's reference point.")
    split: Literal["train", "validation", "test"] = Field("test", description="Which split to score.")
    max_samples: int | None = Field(None, ge=1, description="Score at most this many rows.")


# MT-Bench's sampling temperatures by category: creative answers sampled, exact ones greedy.
DEFAULT_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}


# The project's own question sets (llmfactory_runtime/benchmark/questions/<language>.jsonl).
BUILTIN_QUESTION_LANGUAGES = ("en", "ru", "zh")


class Judge(ApiModel):
    """MT-Bench-style judging of multi-turn answers by an LLM judge: single-answer grading (1-10),
    and/or pairwise comparison with the baseline's answers."""

    cel_rules: ClassVar = [
        {"rule": "has(self.model) != has(self.openai)", "message": "set exactly one of model or openai"},
        {"rule": "!(has(self.questionsUri) && has(self.questionsDataset))",
         "message": "set at most one of questionsUri or questionsDataset"},
        {"rule": "has(self.questionsUri) || has(self.questionsDataset) || self.languages.all(l, l in "
                 f"{list(BUILTIN_QUESTION_LANGUAGES)})", "fieldPath": ".languages",
         "message": f"the built-in question sets are {', '.join(BUILTIN_QUESTION_LANGUAGES)}: give questionsUri or "
                    "questionsDataset to ask in other languages"},
        detectable("languages", "languageRule detects each answer's language", unless="!self.languageRule",
                   then="set languageRule false to ask in others"),
    ]

    openai: OpenAIEndpoint | None = Field(None, description="An OpenAI-compatible judge, e.g. gpt-4o.")
    model: TrainedModelSource | None = Field(None, description="A local judge model run with transformers (its rating "
                                                        "is the expectation over its probabilities of 1..10).")
    languages: list[Annotated[str, Field(pattern=LANGUAGE_PATTERN, max_length=3)]] = Field(
        default_factory=lambda: list(BUILTIN_QUESTION_LANGUAGES), min_length=1, max_length=64,  # CEL's cost bound
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Languages to ask in: the built-in question sets (en, ru, zh), or the questions of questionsUri "
                    "or questionsDataset whose `language` is listed (read as a code: a BCP 47 tag's language, an ISO "
                    "639-3 code's or a language name's: pt-BR, por and Portuguese are pt).")
    questions_dataset: HuggingFaceDataset | None = Field(
        None, description="A Hugging Face dataset of questions instead of the built-in sets (MT-Bench's own, "
                          "ru_mt_bench...), with the same columns as questionsUri.")
    questions_uri: str | None = Field(
        None, pattern=URI_PATTERN, description="JSONL of questions instead of the built-in sets: question_id, "
                                               "category, turns (one or two), optional reference and language.")
    max_questions: int | None = Field(None, ge=1, description="Questions per language, at most.")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Longest answer of the model under test.")
    batch_size: int = Field(8, ge=1, le=512, description=BATCH_SIZE_DESCRIPTION.format(what="Questions"))
    engine: Engine = Field("auto", description=ENGINE_DESCRIPTION.replace("the local model", "the model under "
                                                                          "test (and its baseline)"))
    temperatures: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_TEMPERATURES),
        description="Sampling temperature of the model under test per question category; unlisted: 0 (greedy).")
    language_rule: bool = Field(True, description="An answer confidently in another language than its question "
                                                  "scores 1 (loses a comparison) without asking the judge.")
    max_reasks: int = Field(2, ge=0, le=5, description="Times an API judge whose reply has no [[rating]] (or "
                                                       "[[A]], [[B]], [[C]]) is asked again; after that the "
                                                       "answer counts as unrated (the comparison as undecided).")
    mode: Literal["single", "pairwise", "both"] = Field("single", description=(
        "single: each answer graded 1-10 on its own (judge.score, judge.baseline...). pairwise: the model's "
        "answer and the baseline's to the same turn shown side by side, the judge names the better one "
        "or a tie, asked twice with the two in swapped places; a win needs both orders to agree, so the "
        "judge's preference for a position counts as a tie (MT-Bench's pairwise-baseline mode). Reports "
        "judge.winRate (wins plus half the ties, of the decided comparisons; 0.5 is even), judge.wins, "
        "judge.ties, judge.losses, judge.undecided, and judge.winRate per language and turn; often "
        "tells models apart that single grades both about the same. Needs the baseline (a fineTuneRef "
        "model, baseline true) or opponentAnswersUri. both: single and pairwise."))
    opponent_answers_uri: str | None = Field(None, pattern=URI_PATTERN, description=(
        "A JSONL file of another model's answers to the same questions, e.g. GPT-4's, written once (MT-Bench's "
        "model_answer rows {question_id, choices: [{turns}]}, or {question_id, turns}): modes pairwise and both "
        "compare the model with these answers instead of the baseline's (MT-Bench's pairwise-baseline against "
        "gpt-3.5-turbo, AlpacaEval's win rate against a reference model), and need no baseline for it. Every "
        "question asked needs an answer with a turn for each of its turns."))


class LmEval(ApiModel):
    """EleutherAI lm-evaluation-harness tasks, offline (multiple-choice suites such as MMLU)."""

    tasks: list[str] = Field(min_length=1, json_schema_extra={"x-kubernetes-list-type": "set"},
                             description="Task or group names, as lm_eval --tasks takes them; metrics are "
                                         "reported as lmEval.<task>.<metric>.")
    tasks_uri: str | None = Field(
        None, pattern=URI_PATTERN, description="A folder (s3:// or file://) of task YAML files and their data, "
                                               "lm_eval's --include_path; data_files paths are relative to it. "
                                               "Set: only its tasks; unset: lm_eval's built-in tasks, whose data "
                                               "comes from the hub.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per question; unset: the task's own.")
    limit: int | None = Field(None, ge=1, description="Score at most this many examples per task.")
    batch_size: int = Field(8, ge=1, le=512, description="Requests scored together.")
    chat_template: bool = Field(False, description="Wrap prompts in the model's chat template.")


class Reward(ApiModel):
    """The grader's mean reward (0-1, or the range of a python grader's) of the model's greedy answers to
    held-out prompts with reference answers: what a GRPO FineTune raises, measured as it measures its
    validation prompts."""

    grader: Grader = Field(default_factory=Grader, description=(
        "How each answer is scored: usually the GRPO FineTune's grpo.grader, written again here."))
    dataset: DatasetInput | None = Field(None, description=(
        "Prompts with reference answers ({messages} ending with a user turn, or {prompt}, beside "
        "grader.referenceField; for operation toolCalls, conversations ending with the assistant's turn, as a "
        "FineTune's tool-calling rows, or a DatasetBuild's of format chatml); defaults to the FineTune's dataset, when it trained with objective grpo "
        "(the model a fineTuneRef, or a quantizationRef of such a FineTune), or, with grader toolCalls, when it "
        "trained on conversations (dataset.uri, or a DatasetBuild's of format chatml; split says which split)."))
    split: Literal["train", "validation", "test"] = Field("test", description="Which split's prompts to answer.")
    max_samples: int | None = Field(None, ge=1, description="Answer at most this many prompts.")
    max_new_tokens: int = Field(256, ge=1, le=131072, description="Longest answer (the FineTune's grpo.maxNewTokens).")
    batch_size: int = Field(8, ge=1, le=512, description=BATCH_SIZE_DESCRIPTION.format(what="Prompts"))
    engine: Engine = Field("auto", description=ENGINE_DESCRIPTION.replace("the local model", "the model under "
                                                                          "test (and its baseline)"))


class Ranking(ApiModel):
    """How a reward model (a FineTune with objective reward, or any sequence-classification model with
    one label) ranks held-out preference pairs, as RewardBench scores one: the share whose chosen
    answer it scores above the rejected one (ranking.accuracy; a tie counts as wrong) and the mean
    score difference (ranking.margin), each conversation scored alone as a grader scores it."""

    dataset: DatasetInput | None = Field(None, description=(
        "Preference rows (prompt, chosen, rejected; or OpenAI's preferred_output and non_preferred_output); "
        "defaults to the dataset the reward model's FineTune trained on."))
    split: Literal["train", "validation", "test"] = Field("test", description="Which split's pairs to rank.")
    max_samples: int | None = Field(None, ge=1, description="Rank at most this many pairs.")
    batch_size: int = Field(8, ge=1, le=512, description="Conversations scored together (right-padded).")
    languages: list[Annotated[str, Field(pattern=LANGUAGE_PATTERN)]] = Field(
        default_factory=list, json_schema_extra={"x-kubernetes-list-type": "set"}, description=(
        "Also report ranking.accuracy.<language> (and ranking.baseline.<language> against a baseline) for "
        "these languages, which gates may name: the pairs whose row says that language (a DatasetBuild's "
        "rows do). A listed language without pairs fails the run, naming the languages the rows have. The "
        "report shows every language the rows have either way."))


class Gate(ApiModel):
    metric: str = Field(pattern=pattern(r"^[a-zA-Z][\w.]*$", "a metric's name, e.g. judge.score"),
                        description="A metric of the result, e.g. judge.score, judge.winRate, perplexity.value, "
                                    "perplexity.changePercent, reward.value, ranking.accuracy.")
    op: Literal[">=", ">", "<=", "<"] = Field(description="Comparison the metric must satisfy.")
    value: float = Field(description="Threshold.")


class BenchmarkSpec(RunOptions):
    cel_rules: ClassVar = [
        {"rule": "has(self.perplexity) || has(self.judge) || has(self.lmEval) || has(self.reward) || "
                 "has(self.ranking)",
         "message": "enable at least one of perplexity, judge, lmEval, reward or ranking"},
        {"rule": "!has(self.ranking) || !(has(self.perplexity) || has(self.judge) || has(self.lmEval) || "
                 "has(self.reward))",
         "message": "ranking benchmarks a reward model, which writes no answers and has no perplexity: use it alone "
                    "(a language model's preference of the chosen answers is perplexity's preference.accuracy on "
                    "preference pairs)"},
        {"rule": "!has(self.ranking) || !has(self.model.quantizationRef)",
         "message": "ranking benchmarks a reward model; a Quantization holds a language model: name the reward "
                    "model by fineTuneRef or source"},
        {"rule": "!has(self.judge) || !has(self.judge.mode) || self.judge.mode == 'single' || "
                 "has(self.judge.opponentAnswersUri) || !has(self.baseline) || self.baseline",
         "message": "judge.mode pairwise and both compare the model with its baseline: set baseline true (or "
                    "judge.opponentAnswersUri)"},
        {"rule": "!has(self.baselineModel) || !has(self.baseline) || self.baseline",
         "message": "baselineModel is the baseline to evaluate: set baseline true (or leave it unset)"},
        {"rule": "!has(self.judge) || self.judge.engine != 'vllm' || !has(self.model.source) || "
                 "!has(self.model.source.ggufFile)",
         "message": "judge.engine vllm cannot load a GGUF model (model.source.ggufFile): use engine transformers "
                    "or auto"},
    ]

    model: ModelUnderTest = Field(description="The model to evaluate.")
    baseline: bool = Field(True, description=(
        "Also evaluate a baseline, for comparison (*.baseline metrics, judge.mode pairwise): the FineTune's "
        "base model, or baselineModel."))
    baseline_model: ModelUnderTest | None = Field(None, description=(
        "The baseline, instead of the FineTune's base: e.g. the FineTune a Quantization was made from (did "
        "quantizing cost judge score?), another FineTune of the same base (which hyperparameters won?), or "
        "the SFT model a DPO one started from. It runs on the same questions, dataset and tasks; the Benchmark "
        "waits for it as for the model."))
    perplexity: Perplexity | None = Field(None, description="Perplexity on held-out conversations.")
    judge: Judge | None = Field(None, description="LLM-as-judge scores on built-in questions (1-10).")
    lm_eval: LmEval | None = Field(None, description="lm-evaluation-harness tasks.")
    reward: Reward | None = Field(None, description=(
        "A grader's reward of greedy answers to held-out prompts (reward.value, and reward.baseline with a baseline; "
        "a sum grader's parts apart as reward.value.<part> and reward.baseline.<part>)."))
    ranking: Ranking | None = Field(None, description=(
        "The model under test is a reward model: how it ranks held-out preference pairs (ranking.accuracy, "
        "ranking.margin; ranking.baseline, the baseline's accuracy, when baselineModel names another reward "
        "model: a reward model's base is a language model, not compared)."))
    gates: list[Gate] = Field(default_factory=list, description="All must hold for result.passed.")


class GateOutcome(ApiModel):
    gate: str = Field(description="The gate as text.")
    value: float | None = Field(None, description="The metric's value; unset when the metric is missing.")
    passed: bool = Field(description="Whether it held.")


class BenchmarkResult(ApiModel):
    metrics: dict[str, float] = Field(description="Every figure, by dotted name (what gates refer to).")
    gates: list[GateOutcome] = Field(default_factory=list, description="Each gate's outcome.")
    passed: bool = Field(description="Every gate held.")
    report_uri: str = Field(description="report.md and report.json.")
    compared_with: Literal["baseline", "opponent"] | None = Field(None, description=(
        "judge.mode pairwise and both: whose answers judge.winRate is against, the baseline's or the "
        "opponent's (judge.opponentAnswersUri)."))
    judge_usage: ApiUsage | None = Field(None, description=(
        "With questions: the judgements asked of the judge (cost: judge.openai.price)."))
    grader_usage: dict[str, ApiUsage] | None = Field(None, description=(
        "reward.grader's API endpoints (an API judge, a cosine's embeddings): what was asked of each, by "
        "endpoint field (judge, embeddings) or, in a sum, by part name (cost: its price)."))


class BenchmarkStatus(StatusBase):
    result: BenchmarkResult | None = Field(None, description="Set when the benchmark finished.")


KIND = KindInfo(
    kind="Benchmark", plural="benchmarks", short_names=["bench"], phase="benchmark",
    spec=BenchmarkSpec, status=BenchmarkStatus, headline_column="Score",
    description="Scores a model: perplexity, an LLM judge, lm-eval tasks and a grader's reward, with pass/fail gates.",
)
