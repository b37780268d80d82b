"""DatasetBuild: prompts -> teacher answers (or the sources' own) -> filtered, split conversations."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from .common import (BATCH_SIZE_DESCRIPTION, ENGINE_DESCRIPTION, NAME_PATTERN, URI_PATTERN, ApiModel, ApiUsage,
                     Engine, KindInfo, ModelSource, OpenAIEndpoint, RewardModelSource, RunOptions, StatusBase,
                     TrainedModelSource, pattern)
from .fine_tune import Grader

# The languages the offline detector (py3langid 0.4's model) tells apart: a DatasetBuild's
# languageDetection and a Benchmark's languageRule detect among them (a test checks them against it).
DETECTABLE_LANGUAGES = (
    "ace", "af", "am", "an", "ar", "ary", "arz", "as", "az", "ba", "bcl", "be", "bg", "bn", "br", "bs", "ca", "crh",
    "cs", "cy", "da", "de", "dz", "el", "en", "eo", "es", "et", "eu", "ext", "fa", "fi", "fo", "fr", "fuv", "fy",
    "ga", "gcf", "gcr", "gd", "gl", "gom", "grc", "gu", "gug", "guw", "ha", "hbo", "he", "hi", "hr", "ht", "hu",
    "hy", "id", "ig", "is", "it", "ja", "jv", "ka", "kab", "kik", "kk", "km", "kn", "ko", "ku", "ky", "la", "lb",
    "lg", "lij", "ln", "lo", "lt", "ltg", "lv", "mg", "mk", "ml", "mn", "mr", "ms", "mt", "my", "ne", "nl", "nn",
    "no", "nso", "oc", "om", "or", "pa", "pcm", "pl", "ps", "pt", "qu", "ro", "ru", "rw", "sa", "sdh", "se", "si",
    "sk", "sl", "sn", "so", "sq", "sr", "st", "sv", "sw", "ta", "te", "tg", "th", "tk", "tl", "tr", "tt", "ug", "uk",
    "ur", "uz", "uzs", "vec", "vi", "vo", "wa", "wuu", "xh", "yo", "yue", "zh", "zu", "zxx",
)


def detectable(field: str, why: str, unless: str = "", then: str = "") -> dict[str, str]:
    """The CEL rule that every language of a list field (camelCase) is one the detector knows, unless
    a condition holds."""
    rule = f"self.{field}.all(l, l in {list(DETECTABLE_LANGUAGES)})"
    return {"rule": f"{unless} || {rule}" if unless else rule, "fieldPath": f".{field}",
            "message": f"{why} among the {len(DETECTABLE_LANGUAGES)} languages py3langid knows (ISO 639 codes, e.g. "
                       "en, ru, zh, de, ja; `kubectl explain datasetbuild.spec.languageDetection.candidates` lists "
                       "them)" + (f": {then}" if then else "")}


LANGUAGE_PATTERN = pattern(r"^[a-z]{2,3}$", "an ISO 639 language code of 2 or 3 lowercase letters, e.g. en, ru, zh")


class InlinePrompt(ApiModel):
    text: str = Field(min_length=1, description="The user prompt (format text: a document).")
    language: str | None = Field(None, pattern=LANGUAGE_PATTERN,
                                 description="ISO 639 code of the prompt's language, e.g. en, ru, zh.")


class HuggingFaceDataset(ApiModel):
    id: str = Field(pattern=pattern(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$",
                                    "a Hugging Face dataset id, owner/name or name"),
                    description="Dataset repository id, e.g. lightblue/tagengo-gpt4.")
    config: str | None = Field(None, description="Configuration (subset) name.")
    split: str = Field("train", description="Split to read.")
    revision: str | None = Field(None, description="Git revision; pin a commit for reproducible digests.")


class ConfigMapFile(ApiModel):
    name: str = Field(pattern=NAME_PATTERN, description="A ConfigMap in the DatasetBuild's namespace.")
    key: str = Field(pattern=pattern(r"^[-._a-zA-Z0-9]+\.(jsonl|json|parquet)$",
                                     "a ConfigMap key (letters, digits, '-', '_', '.') ending .jsonl, .json or .parquet"),
                     description="The key holding the file: .jsonl or .json under data, .parquet under binaryData.")


class Source(ApiModel):
    """One place prompts come from."""

    cel_rules: ClassVar = [
        {"rule": "(has(self.inline) ? 1 : 0) + (has(self.uri) ? 1 : 0) + (has(self.huggingface) ? 1 : 0)"
                 " + (has(self.configMap) ? 1 : 0) == 1",
         "message": "set exactly one of inline, uri, huggingface or configMap"},
        {"rule": "!has(self.messagesField) || !has(self.fields) || self.fields in ['auto', 'openai', 'sharegpt']",
         "fieldPath": ".messagesField",
         "message": "messagesField names the column of a conversation: fields auto, openai or sharegpt"},
    ]

    inline: list[InlinePrompt] | None = Field(None, min_length=1, description="Prompts written in the manifest.")
    uri: str | None = Field(None, pattern=URI_PATTERN,
                            description="A .jsonl or .parquet file (s3:// or file://); a .json file of "
                                        "JSON lines or of one JSON array of rows (Alpaca's alpaca_data.json).")
    huggingface: HuggingFaceDataset | None = Field(None, description="A Hugging Face dataset.")
    config_map: ConfigMapFile | None = Field(
        None, description="A file kept in a ConfigMap (up to 1 MiB), mounted into the pod. An edit to it is a new "
                          "run (noticed at the operator's next poll); locally, a ConfigMap among the applied manifests.")
    fields: Literal["auto", "prompt", "sharegpt", "openai", "alpaca", "glaive", "xlam", "preference"] = Field(
        "auto", description="How rows hold prompts: prompt (a text column, promptField), sharegpt "
                            "(conversations: [{from, value}]), openai (messages: [{role, content}]; a "
                            "function-calling row, with an assistant's tool_calls and role tool results beside "
                            "its tools (or its tools alone, none called), is kept whole by a build without a teacher that writes chatml and asks "
                            "no judge or pairs, through the answer filters and dedupe; any other build drops it "
                            "as tool_calls, rather than rebuild its turns without the calls; so is a sharegpt or openai row in "
                            "hermes-function-calling-v1's form, its functions in <tools> and calls in <tool_call> "
                            "texts, read as tool calls), alpaca "
                            "(instruction, input, output, system; Dolly's context and response), glaive (glaive-function-calling-v2's system and chat texts, "
                            "read as the openai row they say the same as: the functions after the system's words "
                            "its tools, a <functioncall> an assistant's tool call, a FUNCTION RESPONSE a tool's "
                            "result), xlam (Salesforce's xlam-function-calling-60k: {query, tools, answers}, read "
                            "as the openai row of the query and its calls, the tools' parameters as JSON Schema; "
                            "fields prompt with promptField query asks a teacher the queries instead), preference (TRL's pairs: chosen and rejected, each messages "
                            "or a text, after prompt, or else after what the chosen and rejected conversations "
                            "share, as UltraFeedback's; OpenAI's input.messages, preferred_output and "
                            "non_preferred_output; or Anthropic HH's transcripts, each turn after '\\n\\nHuman: ' or "
                            "'\\n\\nAssistant: '; the rows a FineTune reads as pairs; for a build without a "
                            "teacher, whose dataset is then the "
                            "pairs, with their score_chosen and score_rejected where the rows hold both, as "
                            "UltraFeedback's, or else filters.judge's ratings of both answers; a pair whose "
                            "rejected answer scores at least as high as the chosen is dropped, "
                            "preference_not_better). "
                            "auto picks by the columns present (never preference).")
    messages_field: str | None = Field(None, min_length=1, description=(
        "Column holding each row's conversation, where it is not messages (openai) or conversations "
        "(sharegpt): e.g. conversation for lmsys-chat-1m and WildChat ([{role, content}]), as Axolotl's "
        "field_messages; fields auto reads a conversation column of [{role, content}] or [{from, value}] "
        "by itself, and Capybara's exchanges [{input, output}], each a user's turn and its answer."))
    prompt_field: str = Field("prompt", description=(
        "Column holding the prompt text (fields: prompt; and fields: preference, where the prompt is read from "
        "it when the row has it, e.g. question for Intel/orca_dpo_pairs)."))
    system_field: str | None = Field(None, description=(
        "Column holding a system message, for rows whose conversation has none (e.g. OpenOrca's "
        "system_prompt, Intel/orca_dpo_pairs' system); an empty one is none. Unset: a conversation's (sharegpt, "
        "openai) is read from a system column, as LLaMA-Factory's rows hold it."))
    system_prompt: str | None = Field(None, min_length=1, description=(
        "A system message for this source's rows that hold none (neither in their conversation nor in "
        "systemField), e.g. the answer format a GRPO grader's extract reads; it comes before "
        "teacher.systemPrompt."))
    answer_field: str | None = Field(None, description=(
        "Column holding the answer to the prompt (fields: prompt), e.g. response, completion, a final answer "
        "(text, or a number): what a build without a teacher keeps. Conversations (sharegpt, openai) hold their "
        "answers, alpaca rows in output (Dolly's in response)."))
    text_field: str | None = Field(None, description=(
        "Column holding the document (a text) of each row, for format text (continued pre-training); unset: "
        "text, as Wikipedia's and FineWeb's rows have it (The Stack's: content)."))
    language_field: str = Field("language", description=(
        "Column holding the prompt's language, read as the code samplesPerLanguage counts: a BCP 47 tag's "
        "language (OpenAssistant's pt-BR: pt), an ISO 639-3 code's (Aya's eng: en), a language's name in English "
        "or in itself (Tagengo's Russian, Русский: ru); a label that names no language is kept as written."))
    language: str | None = Field(None, pattern=LANGUAGE_PATTERN,
                                 description="Language of every prompt of this source that does not name its own.")
    turns: Literal["all", "first"] = Field(
        "all", description="Of a multi-turn conversation, ask the teacher every user turn (each seeing its "
                           "earlier answers) or only the first; without a teacher, keep every answered turn "
                           "or only the first.")
    max_rows: int | None = Field(None, ge=1, description=(
        "Read at most this many rows (in file order). A huggingface source then streams them: only the "
        "shards they are in are downloaded, not the whole split (the first 100k documents of FineWeb)."))
    split: Literal["train", "validation", "test"] | None = Field(None, description=(
        "Put every kept row of this source into this split (e.g. GSM8K's own test split as the test split), "
        "besides spec.split's shares of the other sources' rows. A duplicate or near-duplicate of a test "
        "(then validation) source's prompt is dropped from the other sources, whatever their order: no "
        "held-out question is trained on; nor does difficulty filter a test or validation source's rows."))


class Teacher(ApiModel):
    """The model that answers the prompts: an OpenAI-compatible API or a local model."""

    cel_rules: ClassVar = [
        {"rule": "has(self.model) != has(self.openai)", "message": "set exactly one of model or openai"},
        {"rule": "self.engine == 'auto' || has(self.model)",
         "message": "engine applies to a local model teacher (model), not to openai"},
        {"rule": "self.engine != 'vllm' || !has(self.model) || !has(self.model.ggufFile)",
         "message": "engine vllm cannot load a GGUF model (model.ggufFile): use engine transformers or auto"},
        {"rule": "self.samples == 1 || self.temperature > 0",
         "message": "samples above 1 need temperature above 0: greedy decoding writes the same answer every time"},
    ]

    openai: OpenAIEndpoint | None = Field(None, description="An OpenAI-compatible chat-completions endpoint.")
    model: TrainedModelSource | None = Field(None, description="A local model run inside the phase's pod (see engine).")
    engine: Engine = Field("auto", description=ENGINE_DESCRIPTION)
    system_prompt: str | None = Field(None, description="System message sent before every prompt.")
    temperature: float = Field(0.0, ge=0, le=2, description="0 decodes greedily (reproducible).")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Longest answer, in tokens.")
    batch_size: int = Field(8, ge=1, le=512, description=BATCH_SIZE_DESCRIPTION.format(what="Prompts") + (
        " vLLM schedules every prompt of a turn itself."))
    seed: int = Field(0, description="Sampling seed when temperature > 0.")
    samples: int = Field(1, ge=1, le=16, description=(
        "Answers sampled per turn (rejection sampling, as Llama 3's SFT data; above 1 it needs temperature "
        "above 0 and filters.judge): the judge rates every answer the filters keep and the conversation goes "
        "on with the best-rated one, dropped when even that rates below minScore. Each is cached: a build "
        "with more samples asks only for the new ones."))
    reasoning: Literal["keep", "drop"] = Field("keep", description=(
        "A reasoning model's chain of thought, which its API returns apart from the answer (DeepSeek's and "
        "vLLM's reasoning_content, OpenRouter's reasoning) and a local teacher (or a server without a reasoning "
        "parser) writes before it in <think> tags (Qwen3's; DeepSeek-R1's distilled models' prompt opens the tag): "
        "keep writes it with each answer, for a student that "
        "learns to reason (chatml: the assistant message's reasoning_content, which a FineTune gives a template "
        "that reads it, Qwen3's or gpt-oss', and writes in <think> tags before the answer for any other; "
        "sharegpt: in <think> tags); drop keeps the answers alone. It is cached with the answer either way: "
        "switching asks nothing again. The filters and judge read the answer; maxAnswerTokens counts the "
        "reasoning a row keeps, not what drop leaves out or an API keeps to itself (OpenAI's reasoning models): "
        "those are counted less the reasoning tokens the API reports (all of them where it reports none), a "
        "local teacher's answer in its tokenizer. Preference pairs and graded prompts hold answers alone."))


class LanguageDetection(ApiModel):
    """Detect each prompt's language offline (py3langid); the detected code replaces the source's label."""

    cel_rules: ClassVar = [detectable("candidates", "candidates: each prompt's language is detected")]

    candidates: list[Annotated[str, Field(pattern=LANGUAGE_PATTERN, max_length=3)]] = Field(
        default_factory=list, max_length=len(DETECTABLE_LANGUAGES), description=(
            "Languages to choose between (ISO 639 codes); empty: the keys of samplesPerLanguage, or all "
            f"{len(DETECTABLE_LANGUAGES)} the model knows: {', '.join(DETECTABLE_LANGUAGES)}. Fewer is more accurate."))
    min_confidence: float = Field(0.5, ge=0, le=1, description="Drop prompts detected with less confidence.")


class AnswerJudge(ApiModel):
    """A judge model rates each kept answer 1-10 (the Benchmark's single-answer grading prompt)."""

    cel_rules: ClassVar = [
        {"rule": "has(self.model) != has(self.openai)", "message": "set exactly one of model or openai"},
    ]

    openai: OpenAIEndpoint | None = Field(None, description="An OpenAI-compatible judge; its ratings are cached.")
    model: TrainedModelSource | None = Field(None, description="A local judge, read by the log-probabilities of its ratings "
                                                        "(cached too).")
    min_score: float = Field(6, ge=1, le=10, description="Drop answers rated below this.")
    max_reasks: int = Field(1, ge=0, le=5, description="Ask an API judge again this many times when its reply "
                                                       "has no [[rating]]; still none: the answer is dropped.")


class Filters(ApiModel):
    cel_rules: ClassVar = [
        {"rule": "!has(self.tokenizer) || has(self.maxPromptTokens) || has(self.maxAnswerTokens)",
         "message": "tokenizer counts maxPromptTokens (and, without a teacher, maxAnswerTokens): set one of them"},
    ]

    refusals: bool = Field(True, description="Drop answers that refuse (English, Russian, Chinese patterns).")
    refusal_patterns: list[str] = Field(default_factory=list,
                                        description="Extra case-insensitive regular expressions marking a refusal.")
    drop_truncated: bool = Field(True, description="Drop answers cut off at maxNewTokens.")
    min_answer_chars: int = Field(1, ge=0, description="Drop answers (format text: documents) shorter than this.")
    max_answer_chars: int | None = Field(None, ge=1, description="Drop answers (format text: documents) longer "
                                                                  "than this.")
    max_answer_tokens: int | None = Field(None, ge=1, description=(
        "Drop answers longer than this, in the teacher's tokens (without a teacher: filters.tokenizer's); a "
        "reasoning teacher's thoughts count where the row keeps them (teacher.reasoning)."))
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Drop a conversation whose system message and user turns together are longer than "
                                "this, in the tokens of filters.tokenizer (or the local teacher's), before the "
                                "teacher is asked: keep it under the fine-tune's maxSeqLength.")
    tokenizer: ModelSource | None = Field(
        None, description="Whose tokens maxPromptTokens (and, without a teacher, maxAnswerTokens) counts, usually "
                          "the student's base model. Required with them, unless a local teacher's count.")
    judge: AnswerJudge | None = Field(None, description="Drop answers a judge model rates below minScore.")
    near_duplicate_threshold: float = Field(
        0.85, ge=0, le=1, description="Drop a prompt whose estimated Jaccard similarity (MinHash over word or "
                                      "character shingles) to an earlier one reaches this; 0 removes exact "
                                      "duplicates only.")


class AnotherModel(ApiModel):
    """A model a build asks besides its teacher, answering the conversations as they stand: a local
    model or an OpenAI-compatible API."""

    cel_rules: ClassVar = [
        {"rule": "has(self.model) != has(self.openai)", "message": "set exactly one of model or openai"},
        {"rule": "self.engine == 'auto' || has(self.model)",
         "message": "engine applies to a local model (model), not to openai"},
        {"rule": "self.engine != 'vllm' || !has(self.model) || !has(self.model.ggufFile)",
         "message": "engine vllm cannot load a GGUF model (model.ggufFile): use engine transformers or auto"},
    ]

    model: TrainedModelSource | None = Field(None, description="A local model, run inside the phase's pod.")
    engine: Engine = Field("auto", description=ENGINE_DESCRIPTION)
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Longest answer, in tokens.")
    batch_size: int = Field(8, ge=1, le=512, description="Prompts decoding together (transformers engine).")
    seed: int = Field(0, description="Sampling seed when temperature > 0.")


class RejectedAnswers(AnotherModel):
    """Who writes the rejected answer of each preference pair: a local model, usually the student
    before fine-tuning (its own answers are what DPO should move it away from), or a weaker model
    behind an OpenAI-compatible API (UltraFeedback's way)."""

    cel_rules: ClassVar = AnotherModel.cel_rules + [
        {"rule": "self.samples == 1 || self.temperature > 0",
         "message": "samples above 1 need temperature above 0: greedy decoding writes the same answer every time"},
    ]

    openai: OpenAIEndpoint | None = Field(None, description=(
        "An OpenAI-compatible chat-completions endpoint (its own apiKeySecret, rate limits and retries). "
        "A request it refuses for one prompt (400, 413, 422) drops that pair (rejected_refused)."))
    temperature: float = Field(0.0, ge=0, le=2, description="0 decodes greedily (reproducible).")
    samples: int = Field(1, ge=1, le=16, description=(
        "Answers sampled per conversation (best of N; above 1 it needs temperature above 0, and "
        "preferences.rewardModel or filters.judge to score them all): the lowest-scored one is rejected (with "
        "preferences.chosen best, ranked with the teacher's answer). Each is cached: a build with more samples "
        "asks only for the new ones."))


class Difficulty(AnotherModel):
    """Offline difficulty filtering of GRPO's prompts (format graded), as Skywork-OR1's and Polaris'
    data: the model GRPO will train answers each prompt `samples` times, the grader scores each answer
    against the prompt's reference, and a prompt too easy or too hard for it is dropped; GRPO learns
    nothing from a group whose answers all score the same. Each row keeps its pass rate (pass_rate)."""

    cel_rules: ClassVar = AnotherModel.cel_rules + [
        {"rule": "self.minPassRate < self.maxPassRate", "message": "minPassRate must be below maxPassRate"},
        {"rule": "self.grader.operation != 'toolCalls' && (!has(self.grader.parts) || "
                 "self.grader.parts.all(p, p.operation != 'toolCalls'))",
         "message": "grader operation toolCalls grades tool calls, which a DatasetBuild's prompts do not offer "
                    "(it drops tool-calling rows): grade the prompts' reference answers"},
    ]

    model: TrainedModelSource | None = Field(None, description=(
        "The model GRPO will train (its baseModel, or a FineTune's by fineTuneRef), run inside the phase's pod."))
    openai: OpenAIEndpoint | None = Field(None, description=(
        "An OpenAI-compatible chat-completions endpoint serving that model (e.g. a vLLM server of it; its own "
        "apiKeySecret, rate limits and retries). A request it refuses for one prompt (400, 413, 422) drops "
        "that prompt (difficulty_refused)."))
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature: GRPO's own (grpo.temperature).")
    max_new_tokens: int = Field(512, ge=1, le=32768, description="Longest answer, in tokens: GRPO's grpo.maxNewTokens.")
    samples: int = Field(8, ge=2, le=64, description=(
        "Answers sampled per prompt (GRPO's generations). Each is cached: a build with more samples asks only "
        "for the new ones."))
    grader: Grader = Field(description=(
        "Scores each answer against the prompt's reference, as the GRPO FineTune's grpo.grader will (its "
        "referenceField is reference): the pass rate is the mean of its rewards (of a check, the share of "
        "answers that pass)."))
    min_pass_rate: float = Field(0.0, ge=0, lt=1, description=(
        "Drop a prompt whose pass rate is at or below this (too_hard); 0: one no answer passes."))
    max_pass_rate: float = Field(1.0, gt=0, le=1, description=(
        "Drop a prompt whose pass rate is at or above this (too_easy); 1: one every answer passes."))


class Preferences(ApiModel):
    """Write preference pairs for a FineTune with objective dpo, instead of conversations."""

    reward_model: RewardModelSource | None = Field(None, description=(
        "A reward model that scores both answers of each pair (e.g. a FineTune's with objective reward, by "
        "fineTuneRef; or any sequence-classification model with one label), as filters.judge rates them: its "
        "scores go into the rows (score_chosen, score_rejected) and a pair whose rejected answer scores at least "
        "as high as the chosen one is dropped (preference_not_better). Runs in the phase's pod (each shard's pod "
        "scoring its share); its scores are cached like the judge's ratings, so a restart or a rebuild scores "
        "nothing twice."))
    chosen: Literal["teacher", "best"] = Field("teacher", description=(
        "teacher: the teacher's answer (without a teacher, the source's) is chosen, and rejected.samples' "
        "lowest-scored answer rejected. best: "
        "the teacher's answer and the samples are ranked together by their scores, the highest chosen and the "
        "lowest rejected (the on-policy pairs of SimPO's and Llama 3's recipes: the student's own samples, best "
        "against worst); needs preferences.rewardModel or filters.judge."))
    rejected: RejectedAnswers = Field(description=(
        "Answers the last user turn of every kept conversation (seeing the teacher's earlier turns and "
        "system message); the teacher's answer is the chosen one (see chosen and samples). Answers are cached "
        "like the teacher's; a pair whose two answers are the same is dropped (preference_tie), one without a "
        "rejected answer that is not empty too (rejected_empty). With filters.judge both answers are rated (score_chosen, "
        "score_rejected in the rows) and a pair whose rejected answer rates at least as high as the chosen "
        "one is dropped (preference_not_better); minScore applies to the chosen answers only."))


class Split(ApiModel):
    cel_rules: ClassVar = [
        {"rule": "self.validation + self.test < 1.0", "message": "validation + test must leave rows for train"},
    ]

    validation: float = Field(0.1, ge=0, lt=1, description="Share of rows for validation (of the sources "
                                                           "without a split of their own).")
    test: float = Field(0.1, ge=0, lt=1, description="Share of rows for test (of the sources without a split "
                                                     "of their own).")
    seed: int = Field(42, description="Seed of the shuffle; the same seed gives the same split.")


class DatasetBuildSpec(RunOptions):
    cel_rules: ClassVar = [
        {"rule": "!has(self.teacher) || self.teacher.samples == 1 || (has(self.filters) && has(self.filters.judge))",
         "message": "teacher.samples above 1 need filters.judge to pick the best answer of each turn"},
        {"rule": "self.sources.all(s, s.fields != 'preference') || (!has(self.teacher) && !has(self.preferences) && "
                 "self.sources.all(s, s.fields == 'preference' && s.turns == 'all'))",
         "message": "sources with fields preference hold the pairs a build without a teacher keeps: leave out "
                    "teacher and preferences, give every source fields preference, and keep turns all (a pair "
                    "answers its prompt's last turn)"},
        {"rule": "has(self.teacher) || (has(self.format) && self.format == 'text') || "
                 "self.sources.all(s, !has(s.inline))",
         "message": "inline sources hold prompts without answers: set a teacher to answer them"},
        {"rule": "!has(self.format) || self.format != 'text' || (!has(self.teacher) && !has(self.preferences) && "
                 "!has(self.difficulty) && !(has(self.filters) && has(self.filters.judge)))",
         "message": "format text writes the sources' documents as they are, for continued pre-training: leave out "
                    "teacher, preferences, difficulty and filters.judge, which answer and rate prompts"},
        {"rule": "!has(self.format) || self.format != 'text' || self.sources.all(s, (!has(s.fields) || "
                 "s.fields == 'auto') && !has(s.answerField) && !has(s.systemField) && !has(s.systemPrompt))",
         "message": "format text reads each row's document in the source's textField: leave fields, answerField, "
                    "systemField and systemPrompt unset"},
        {"rule": "(has(self.format) && self.format == 'text') || self.sources.all(s, !has(s.textField))",
         "message": "textField names the column of format text's documents: set format text (a prompt column is "
                    "promptField)"},
        {"rule": "!has(self.format) || self.format != 'text' || !has(self.filters) || "
                 "(!has(self.filters.maxPromptTokens) && !has(self.filters.maxAnswerTokens) && "
                 "!has(self.filters.tokenizer))",
         "message": "format text keeps whole documents (a FineTune learns a long one in pieces of maxSeqLength): "
                    "bound their length with filters.minAnswerChars and maxAnswerChars, not maxPromptTokens, "
                    "maxAnswerTokens or tokenizer"},
        {"rule": "has(self.teacher) || self.shards == 1 || has(self.preferences) || has(self.difficulty) || "
                 "(has(self.filters) && has(self.filters.judge))",
         "message": "shards split the models' work (the teacher's, filters.judge's, preferences', difficulty's): a "
                    "build without any (the sources' own answers, only filtered) runs in one pod"},
        {"rule": "!has(self.teacher) || !has(self.filters) || !has(self.filters.tokenizer) || "
                 "has(self.filters.maxPromptTokens)",
         "message": "filters.tokenizer counts maxPromptTokens (a teacher's answers count in its own tokens): set "
                    "maxPromptTokens"},
        {"rule": "!has(self.preferences) || !has(self.format) || self.format == 'chatml'",
         "message": "preferences write TRL's prompt, chosen and rejected messages: leave format chatml"},
        {"rule": "!has(self.format) || self.format != 'graded' || self.sources.all(s, s.fields != 'preference')",
         "message": "format graded writes each conversation's prompt with its answer as the reference: sources "
                    "with fields preference hold pairs, written as they are (leave format chatml)"},
        {"rule": "!has(self.referencePattern) || (has(self.format) && self.format == 'graded')",
         "message": "referencePattern takes the reference out of each answer for format graded: set format graded"},
        {"rule": "!has(self.difficulty) || (has(self.format) && self.format == 'graded')",
         "message": "difficulty filters GRPO's prompts with references: set format graded"},
        {"rule": "!has(self.preferences) || !has(self.preferences.rewardModel) || !has(self.filters) || "
                 "!has(self.filters.judge)",
         "message": "both filters.judge and preferences.rewardModel would score the pairs: set one"},
        {"rule": "!has(self.preferences) || (self.preferences.rejected.samples == 1 && "
                 "self.preferences.chosen == 'teacher') || has(self.preferences.rewardModel) || "
                 "(has(self.filters) && has(self.filters.judge))",
         "message": "preferences.rejected.samples above 1 and preferences.chosen best pick answers by their scores: "
                    "set preferences.rewardModel or filters.judge"},
    ]

    sources: list[Source] = Field(min_length=1, description="Where the prompts come from.")
    samples_per_language: dict[str, int] | None = Field(
        None, description="Keep at most this many prompts per language code (sampled with split.seed); "
                          "languages not listed are dropped. A test or validation source's prompts (sources[].split) "
                          "are not sampled: in a listed language all are kept, besides the counts. A listed "
                          "language (of a count above 0) that no prompt is in fails the build, naming the "
                          "languages the prompts have. Unset keeps every prompt.")
    language_detection: LanguageDetection | None = Field(
        None, description="Detect prompt languages instead of trusting the sources' labels.")
    teacher: Teacher | None = Field(None, description=(
        "The model that writes the answers. Unset: the sources' own answers are kept (each conversation's "
        "answered turns, alpaca's output, a prompt-completion row's completion, or answerField), filtered, "
        "judged, paired and split as a teacher's would be (never truncated; maxAnswerTokens counts "
        "filters.tokenizer's tokens): a dataset made from an existing one, such as UltraChat or OpenHermes, "
        "without asking a model to write it again. A row without answers is dropped (no_answer), and one "
        "labelled false (KTO's undesirable answer) as undesirable."))
    filters: Filters = Field(default_factory=Filters, description="Which answers to drop.")
    format: Literal["chatml", "sharegpt", "graded", "text"] = Field(
        "chatml", description=(
            "chatml: {messages: [{role, content}]}; sharegpt: {conversations: [{from, value}]}; graded: "
            "{messages (up to the last user turn), reference} for a FineTune with objective grpo (or a "
            "Benchmark's reward): each conversation's last answer, the source's or the teacher's, becomes the "
            "reference its grader compares sampled answers with (see referencePattern; the grader's "
            "referenceField is then reference). text: {text} documents for continued pre-training (a FineTune "
            "with objective sft learns every token; a Benchmark's perplexity reads them): each source row's "
            "textField (an inline source's texts), without a teacher, kept by languageDetection, "
            "samplesPerLanguage, the duplicate filters and filters.minAnswerChars and maxAnswerChars, which "
            "bound a document's characters."))
    reference_pattern: str | None = Field(None, min_length=1, max_length=1024, description=(
        "format graded: a regular expression (Python's re) whose last match in each answer is the reference "
        "(its first group, if it has one), e.g. '#### (.+)' for GSM8K's answers, as a grader's extract reads "
        "an answer; unset, the whole answer. An answer it does not match is dropped (no_reference)."))
    preferences: Preferences | None = Field(None, description=(
        "Write preference pairs ({prompt, chosen, rejected} messages, TRL's form; format preference) for a "
        "FineTune with objective dpo: the teacher's answer (without a teacher, the source's) chosen, "
        "preferences.rejected's answer rejected."))
    difficulty: Difficulty | None = Field(None, description=(
        "format graded: keep the prompts neither too easy nor too hard for the model GRPO will train (its "
        "answers sampled and graded here, cached; each row's pass_rate written)."))
    split: Split = Field(default_factory=Split, description="Train/validation/test split.")
    parquet: bool = Field(True, description="Also write each split as Parquet next to the JSONL.")
    shards: int = Field(1, ge=1, le=128, description=(
        "Split the models' work over this many pods (an Indexed Job; locally, processes): each asks the "
        "teacher, the judge, preferences' and difficulty's models about every N-th prompt, into their "
        "caches, and the last to finish merges. The dataset is the same as with 1 shard. Every API's "
        "concurrency and rate limits stay limits of the whole build: each shard gets 1/N of them."))

    def writes_pairs(self) -> bool:
        """Whether the dataset is preference pairs (format preference): made by preferences, or read from
        sources with fields preference."""
        return self.preferences is not None or self.sources[0].fields == "preference"

    def written_format(self) -> str:
        """The format of the rows the build writes (its result's format)."""
        return "preference" if self.writes_pairs() else self.format

    def runs_a_local_model(self) -> bool:
        """Whether a model runs in the pod (the teacher, the answer judge, the rejected answers'
        writer, the pairs' reward model, difficulty's sampler or its grader's models) rather than behind
        an API: what decides that the build's pod needs a GPU."""
        judge, preferences, difficulty = self.filters.judge, self.preferences, self.difficulty
        graders = [difficulty.grader, *(difficulty.grader.parts or [])] if difficulty else []
        return any(model is not None for model in (
            self.teacher and self.teacher.model, judge and judge.model, preferences and preferences.rejected.model,
            preferences and preferences.reward_model, difficulty and difficulty.model,
            *(m for g in graders for m in (g.judge_model, g.reward_model, g.embedding_model))))


class DatasetBuildResult(ApiModel):
    uri: str = Field(description="Prefix holding train.jsonl, validation.jsonl, test.jsonl and README.md.")
    format: str = Field(description="Row format of the files: chatml, sharegpt, preference, graded or text.")
    digest: str = Field(description="sha256 over the split files.")
    rows: dict[str, int] = Field(description="Rows per split.")
    rows_per_language: dict[str, int] = Field(description="Rows kept per language.")
    dropped: dict[str, int] = Field(description="Rows dropped, per reason.")
    teacher_tokens: int = Field(description="Tokens the teacher generated for the kept and dropped rows.")
    teacher_usage: ApiUsage | None = Field(None, description="What this build asked of the teacher (cost: "
                                                            "teacher.openai.price).")
    dropped_examples: dict[str, list[str]] | None = Field(
        None, description="A few dropped prompts per reason, shortened.")
    judge_usage: ApiUsage | None = Field(
        None, description="filters.judge: ratings asked of an API judge or computed by a local one (cost: "
                          "filters.judge.openai.price).")
    rejected_usage: ApiUsage | None = Field(
        None, description="preferences: rejected answers generated (cost: preferences.rejected.openai.price).")
    reward_model_usage: ApiUsage | None = Field(
        None, description="preferences.rewardModel: answers scored by this build.")
    difficulty_usage: ApiUsage | None = Field(
        None, description="difficulty: answers sampled (cost: difficulty.openai.price).")
    grader_usage: dict[str, ApiUsage] | None = Field(None, description=(
        "difficulty.grader's API endpoints (an API judge, cosine's embeddings), by endpoint field or a sum's "
        "part name (cost: their price)."))


class DatasetBuildStatus(StatusBase):
    result: DatasetBuildResult | None = Field(None, description="Set when the build succeeded.")


KIND = KindInfo(
    kind="DatasetBuild", plural="datasetbuilds", short_names=["dsb"], phase="dataset",
    spec=DatasetBuildSpec, status=DatasetBuildStatus, headline_column="Rows",
    description="Builds a chat dataset: prompts answered by a teacher model (or existing conversations), "
                "filtered and split; or documents for continued pre-training.",
)
