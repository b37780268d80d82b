"""FineTune: a base model trained on a dataset with LoRA or full fine-tuning."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from .common import (ApiModel, ApiUsage, EmbeddingsEndpoint, KindInfo, LocalObjectReference, ModelSource,
                     OpenAIEndpoint, Resources, RewardModelSource, RunOptions, SecretKeyRef, StatusBase,
                     TrainedModelSource, URI_PATTERN, no_credentials_in_url, pattern)


class BaseModel(ModelSource):
    """The model to fine-tune: a Hugging Face repository, a URI, or what another FineTune trained."""

    cel_rules: ClassVar = TrainedModelSource.cel_rules  # a TrainedModelSource's, but planned apart (_base_model)

    fine_tune_ref: LocalObjectReference | None = Field(None, description=(
        "A FineTune in this namespace whose merged model (its mergeAdapter true) this one trains further, "
        "as the OpenAI API fine-tunes a fine-tuned model (e.g. general instructions first, then a domain); "
        "this one waits until that one has succeeded, and runs again on the new model when that one is "
        "retrained."))
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=(
        "Arguments its chat template renders the data with (transformers' apply_chat_template's, vLLM's "
        "chat_template_kwargs): with {enable_thinking: false} Qwen3's empty <think> block is the prompt's, as "
        "it is when Qwen3 answers without reasoning, not learned; GRPO's prompts are rendered so too. The "
        "model saved renders with its template's defaults."),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    def as_source(self) -> dict[str, Any]:
        """The model itself, as a result names it: the wire form without how its template renders."""
        return {k: v for k, v in self.wire().items() if k != "chatTemplateKwargs"}


class DatasetInput(ApiModel):
    cel_rules: ClassVar = [
        {"rule": "has(self.datasetBuildRef) != has(self.uri)", "message": "set exactly one of datasetBuildRef or uri"},
        {"rule": "!has(self.uri) || !self.uri.matches('[.](jsonl|json|parquet)$')", "fieldPath": ".uri",
         "message": "uri is the folder holding train.jsonl (and validation.jsonl, test.jsonl), not a file: name the "
                    "folder, e.g. s3://bucket/data/"},
    ]

    dataset_build_ref: LocalObjectReference | None = Field(None, description=(
        "A DatasetBuild in this namespace: of conversations, of preference pairs (spec.preferences, or sources "
        "with fields preference) for objectives dpo, kto and reward, or of prompts with reference answers "
        "(format graded) for objective grpo, or of documents (format text) for objective sft (continued "
        "pre-training) and a Benchmark's perplexity."))
    uri: str | None = Field(None, pattern=URI_PATTERN, description=(
        "Prefix holding train.jsonl and validation.jsonl: conversations (ChatML messages or ShareGPT; OpenAI's "
        "function-calling rows, the assistant's tool_calls and role tool results beside {tools}, which the "
        "chat template writes, as chatTemplate chatml does in Qwen2.5's and Hermes' form, and its legacy "
        "functions, function_call and role function, LLaMA-Factory's ShareGPT function_call and "
        "observation turns (a system column their system message), hermes-function-calling-v1's <tools>, "
        "<tool_call> and <tool_response> texts (Python literals read as JSON), glaive-function-calling-v2's "
        "{system, chat} texts and xlam-function-calling-60k's {query, tools, answers}; an assistant "
        "message of weight 0 is context, not learned, as OpenAI's fine-tuning reads it; Alpaca's {instruction, "
        "input, output} (Dolly's {instruction, context, response}; a system column first) and TRL's prompt-completion rows {prompt, completion}, text or messages, each a "
        "conversation of one turn), raw "
        "text ({text}: documents for continued pre-training, every token learned, with the tokenizer's "
        "beginning- and end-of-sequence tokens, as TRL's language-modeling rows and Axolotl's completion "
        "type; objective sft, alone or mixed with conversations), or "
        "preference pairs in OpenAI's or TRL's form (UltraFeedback's whole conversations beside their prompt, "
        "Anthropic HH's transcripts), which a FineTune with objective dpo or kto learns from "
        "(anything else reads each pair's prompt with its chosen answer), or TRL's unpaired rows {prompt, "
        "completion, label} for objective kto (anything else reads the desirable ones), or prompts with "
        "reference answers ({messages} ending with a user turn, or {prompt}, beside grpo.grader.referenceField) "
        "for objective grpo."))


class Lora(ApiModel):
    cel_rules: ClassVar = [
        {"rule": "!has(self.embeddingLearningRate) || (has(self.trainEmbeddings) && self.trainEmbeddings)",
         "message": "lora.embeddingLearningRate is the learning rate of the matrices lora.trainEmbeddings trains "
                    "whole: set trainEmbeddings true, or remove it"},
    ]
    r: int = Field(16, ge=1, le=1024, description="Rank of the adapter matrices.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"], min_length=1,
        description="Module names to adapt (e.g. q_proj, v_proj; a name or its dotted end, as peft matches), or "
                    "['all-linear']: every linear layer of the decoder blocks, whatever the architecture calls "
                    "them (not the output head). A name no module of the model has fails the run before its "
                    "weights are read (checked on the model's config), naming the model's linear layers; it is "
                    "refused when applied where the base's architecture is read offline (a known hub id, a local "
                    "config.json or GGUF file; of a fineTuneRef base, the base it trained from) and names its "
                    "layers as Llama's (Llama, Mistral, Qwen2, Gemma).")
    rs_lora: bool = Field(False, description=(
        "Rank-stabilized LoRA: scale the adapter by alpha/sqrt(r) instead of alpha/r, so that high ranks "
        "keep learning (Kalajdzievski, 2023)."))
    train_embeddings: bool | None = Field(None, description=(
        "Also train the input embeddings and the output layer whole beside the adapters (peft's "
        "modules_to_save, Axolotl's lora_modules_to_save: [embed_tokens, lm_head], as Unsloth's continued "
        "pre-training recipe does), one matrix where the model ties them: for a new language or domain "
        "vocabulary that low-rank adapters on the decoder cannot reach. Costs their gradients, fp32 master "
        "copies and Adam moments (on Llama-3-8B about 1B trainable parameters, ~16 GiB, which the estimate "
        "counts), and the adapter holds both matrices. vLLM cannot serve such an adapter beside its base: "
        "engine auto answers with transformers, and the merged model serves. Unset: false."))
    embedding_learning_rate: float | None = Field(None, gt=0, le=1, description=(
        "Peak learning rate of the matrices trainEmbeddings trains whole (Unsloth's embedding_learning_rate; "
        "its continued pre-training recipe uses a tenth of the adapters' rate): a whole embedding matrix "
        "moved at an adapter's rate loses what its pretrained rows knew. Same warmup and schedule as "
        "hyperparameters.learningRate; needs trainEmbeddings. Unset: hyperparameters.learningRate."))
    lora_plus_ratio: float | None = Field(None, ge=1, le=1024, description=(
        "LoRA+ (Hayou et al., 2024; Axolotl's loraplus_lr_ratio, peft's create_loraplus_optimizer): the B "
        "matrices (and DoRA's magnitudes) learn at this many times hyperparameters.learningRate, the A "
        "matrices at it, which the paper found to train faster and better at the same cost; it suggests "
        "16 (lower learningRate to match). Unset: one rate for both."))
    dora: bool = Field(False, description=(
        "Weight-decomposed LoRA (DoRA, Liu et al., 2024): also train each adapted layer's weight "
        "magnitude. Often closer to a full fine-tune at the same rank; costs more time and activation "
        "memory (the estimate counts it). The merged model is an ordinary one; vLLM cannot serve a DoRA "
        "adapter unmerged."))


class QLora(ApiModel):
    """How the frozen base is quantized for QLoRA (bitsandbytes 4-bit)."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 as in the QLoRA paper.")
    double_quantization: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param saved).")
    dequantize_once: Literal["auto", "always", "never"] = Field("never", description=(
        "Dequantize the 4-bit weights once, after loading, and train against that copy in the training "
        "dtype, instead of dequantizing every weight in every forward and backward pass. The adapter "
        "trains against the same 4-bit-rounded weights either way, so the result is the same; once "
        "takes LoRA's memory. never (the default): keep the weights 4-bit, the least memory; on an "
        "H200, Llama-3-8B's dequantization took 3.5% of the GPU's time and the 4-bit run was no slower. "
        "auto: once on a GPU whose free memory holds the LoRA-sized estimate, else 4-bit; always: also "
        "on CPU, refused with the numbers where it cannot fit. Not part of the run's digest: changing it "
        "runs nothing again."))


class EarlyStopping(ApiModel):
    """Stop when the validation loss stops improving (HF Trainer's EarlyStoppingCallback)."""

    patience: int = Field(3, ge=1, le=1000, description=(
        "Evaluations (every hyperparameters.evalEverySteps) in a row without an improvement after which "
        "training stops."))
    min_delta: float = Field(0.0, ge=0, description=(
        "An evaluation improves when its validation loss is lower than the best so far by more than this."))


class Dpo(ApiModel):
    """Preference optimization: Direct Preference Optimization (Rafailov et al., 2023), as OpenAI's
    fine-tuning API and TRL do it, and its variants."""

    cel_rules: ClassVar = [
        {"rule": "!has(self.labelSmoothing) || !has(self.loss) || self.loss == 'sigmoid'",
         "message": "labelSmoothing applies to loss sigmoid (conservative DPO)"},
        {"rule": "!has(self.gamma) || (has(self.loss) && self.loss == 'simpo')",
         "message": "gamma applies to loss simpo"},
    ]

    loss: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = Field("sigmoid", description=(
        "The preference loss, as TRL's loss_type (and Axolotl's rl) names it. Against the reference (the "
        "model before training): sigmoid: DPO's -log sigmoid(margin), starting at ln 2 = 0.693. ipo "
        "(Identity Preference Optimization, Azar et al., 2023): the squared distance of the log-ratio "
        "difference, of per-token mean log-probabilities, from 1/(2 beta); it stops pushing once the "
        "preference is that strong, where DPO keeps widening the gap and can overfit a small or "
        "near-deterministic preference set; starts at (1/(2 beta))^2 (25 with beta 0.1). hinge (SLiC, Zhao et "
        "al., 2023): max(0, 1 - margin), starting at 1. Reference-free, on the per-token mean log-probability "
        "of each answer (no reference pass before training): simpo (Meng et al., 2024): -log sigmoid(beta x "
        "its difference - gamma); its paper uses beta 2 to 2.5 (set beta: the 0.1 default is DPO's). orpo "
        "(Hong et al., 2024): the chosen answer's negative log-likelihood plus beta (ORPO's lambda; 0.1 is "
        "TRL's default) x -log sigmoid of the log odds ratio of the two answers: supervised fine-tuning and "
        "preference in one stage, from a base model that has had no SFT."))
    beta: float = Field(0.1, gt=0, le=10, description=(
        "How far the model may move from the reference (the base model before training): low values "
        "(0.05-0.1) follow the preferences more, high values keep closer to the base. 0.1 is TRL's and "
        "OpenAI's default. simpo: the reward scale (2-2.5 in its paper); orpo: the weight of the odds-ratio "
        "term."))
    gamma: float | None = Field(None, ge=0, le=10, description=(
        "loss simpo: the target reward margin the chosen answer must exceed the rejected one by (TRL's "
        "simpo_gamma); default 0.5."))
    label_smoothing: float | None = Field(None, gt=0, lt=0.5, description=(
        "Conservative DPO (loss sigmoid): treat this share of the pairs as if their labels might be flipped, "
        "-(1 - e) log sigmoid(margin) - e log sigmoid(-margin), for noisy preferences (TRL's label_smoothing; "
        "0.1 is a common value). Unset: plain DPO."))
    sft_weight: float | None = Field(None, gt=0, le=100, description=(
        "Also add this times the chosen answer's mean token negative log-likelihood to each pair's loss "
        "(RPO, Pang et al., 2024; Llama 3's recipe used 0.2): plain DPO often lowers the likelihood of the "
        "chosen answers along with the rejected ones', and this keeps the chosen ones likely (with simpo, "
        "TRL's CPO-SimPO cpo_alpha). Unset: plain DPO."))

    @model_validator(mode="after")
    def _simpo_gamma(self):
        if self.loss == "simpo" and self.gamma is None:
            self.gamma = 0.5  # spelled out in the task, as the other defaults are
        return self


class Kto(ApiModel):
    """Kahneman-Tversky Optimization (Ethayarajh et al., 2024), as TRL's KTOTrainer computes it: from
    answers labelled desirable or undesirable one by one, no pairs needed (thumbs up and down)."""

    beta: float = Field(0.1, gt=0, le=10, description=(
        "How far the model may move from the reference (the base model before training), as DPO's beta: "
        "0.1 is TRL's default."))
    desirable_weight: float = Field(1.0, gt=0, le=100, description=(
        "Weight of the desirable examples' loss. With unequal numbers of desirable and undesirable "
        "examples, KTO's paper advises weights such that desirableWeight x desirable examples / "
        "(undesirableWeight x undesirable examples) lies between 1 and 4/3."))
    undesirable_weight: float = Field(1.0, gt=0, le=100, description="Weight of the undesirable examples' loss.")


class Reward(ApiModel):
    """Reward model training (objective reward), as TRL's RewardTrainer: a Bradley-Terry model of
    preference pairs, one score per conversation, the chosen answer's above the rejected one's."""

    center_rewards_coefficient: float | None = Field(None, gt=0, le=1, description=(
        "Also add this times the squared sum of each pair's two rewards to its loss (TRL's "
        "center_rewards_coefficient; 0.01 in Eisenstein et al., 2023), which keeps the rewards centred on "
        "zero: the pair loss sees only their difference, so without it the scale's offset drifts freely. "
        "Unset: none."))


class GraderPart(ApiModel):
    """One way of scoring an answer against the reference answer its row holds: 1 or 0 when it passes a
    check (as OpenAI's reinforcement fine-tuning string_check grader does), how alike the two are (its
    text_similarity grader), an LLM judge's rating (its score_model grader) or label (its label_model
    grader), or the spec's own Python function (its python grader)."""

    cel_rules: ClassVar = [
        {"rule": "(self.operation in ['judge', 'label']) == (has(self.judge) || has(self.judgeModel))",
         "message": "operations judge and label need grader.judge (an OpenAI-compatible judge) or grader.judgeModel "
                    "(a local one), which apply to them alone"},
        {"rule": "(self.operation == 'label') == (has(self.labels) && has(self.passingLabels))",
         "message": "operation label needs grader.labels (what the judge picks from) and passingLabels (those that "
                    "score 1), which apply to it alone"},
        {"rule": "self.operation != 'label' || has(self.prompt)",
         "message": "operation label needs grader.prompt (what the judge is asked)"},
        {"rule": "!has(self.prompt) || self.operation in ['judge', 'label']",
         "message": "grader.prompt is what a judge is asked: it applies to operations judge and label"},
        {"rule": "!has(self.labels) || !has(self.passingLabels) || self.passingLabels.all(l, l in self.labels)",
         "message": "each of grader.passingLabels must be one of grader.labels"},
        {"rule": "!has(self.labels) || self.labels.all(l, self.labels.exists_one(m, m == l))",
         "message": "grader.labels must differ from one another"},
        {"rule": "!has(self.prompt) || self.prompt.contains('{{sample.output_text}}')",
         "message": "grader.prompt must show the judge the answer: write {{sample.output_text}} where it goes"},
        {"rule": "!(has(self.judge) && has(self.judgeModel))",
         "message": "set one of grader.judge (an OpenAI-compatible judge) or grader.judgeModel (a local one)"},
        {"rule": "(self.operation == 'python') == has(self.source)",
         "message": "operation python needs grader.source (Python defining grade(sample, item)), which applies "
                    "to it alone"},
        {"rule": "(self.operation == 'rewardModel') == has(self.rewardModel)",
         "message": "operation rewardModel needs grader.rewardModel (a sequence-classification model), which "
                    "applies to it alone"},
        {"rule": "!has(self.rewardModel) || !has(self.rewardModel.ggufFile)",
         "message": "rewardModel is a sequence-classification model in safetensors: transformers loads no "
                    "classification head from GGUF"},
        {"rule": "(self.operation == 'similarity') == has(self.metric)",
         "message": "operation similarity needs grader.metric (fuzzy, bleu, gleu, chrf, meteor, rouge1-rouge5, "
                    "rougeL or cosine), which applies to it alone"},
        {"rule": "(has(self.metric) && self.metric == 'cosine') == (has(self.embeddings) || has(self.embeddingModel))",
         "message": "metric cosine needs grader.embeddings (an OpenAI-compatible embeddings endpoint) or "
                    "grader.embeddingModel (a local one), which apply to it alone"},
        {"rule": "!(has(self.embeddings) && has(self.embeddingModel))",
         "message": "set one of grader.embeddings (an OpenAI-compatible endpoint) or grader.embeddingModel (a local "
                    "model)"},
        {"rule": "!has(self.embeddingPrompt) || has(self.embeddingModel)",
         "message": "embeddingPrompt applies to grader.embeddingModel (a local embedding model) alone"},
        {"rule": "!has(self.embeddingModel) || !has(self.embeddingModel.ggufFile)",
         "message": "embeddingModel is an encoder in safetensors: name its folder or repository, not a GGUF file"},
        {"rule": "!has(self.extract) || self.operation in ['equals', 'contains', 'icontains', 'number', 'math', "
                 "'similarity']",
         "message": "extract applies to the equals, contains, icontains, number, math and similarity checks: a "
                    "judge, a python grader or a reward model reads the whole answer, and a sum's parts have their own"},
    ]

    reference_field: str = Field("reference", min_length=1, max_length=253, description=(
        "The row's field holding the reference answer (OpenAI's {{item.<field>}}), a string or a number (of "
        "operation toolCalls, the tool calls expected, unless the row is a conversation ending with them). "
        "Every row needs it, except with operation python, whose grade function reads the row itself, "
        "rewardModel, which reads the prompt and answer only, and label (or judge with grader.prompt), whose "
        "prompt names what it reads."))
    operation: Literal["equals", "contains", "icontains", "number", "math", "similarity", "judge", "label",
                       "python", "rewardModel", "toolCalls"] = Field(
        "equals", description=(
        "The answer is what a reasoning model says after its reasoning (<think>...</think>), as OpenAI's graders "
        "read a reasoning model's output_text; reasoning cut off before it ends answers nothing. "
        "equals: the answer (after extract) is the reference, leading and trailing whitespace aside. "
        "contains: the answer contains the reference; icontains: ignoring case. number: the last number "
        "in the answer (commas and a leading $ allowed) equals the reference's, as GSM8K's and MATH's "
        "graders compare final answers. math: the answer's final mathematical answer (its \\boxed{} one, else "
        "the last expression math-verify finds; prompt for \\boxed{}) equals the reference (a bare answer such "
        "as '\\frac{1}{2}' or a solution with its \\boxed{} answer) symbolically or numerically, by Hugging Face's math-verify "
        "(TRL's accuracy_reward, Open R1's MATH grading): 1/2, 0.5 and \\frac{2}{4} agree, as do "
        "(x+1)^2 and x^2+2x+1, sets, intervals and matrices; an answer or reference it cannot parse scores 0. "
        "similarity: how alike the answer and the reference are, 0-1, by "
        "grader.metric (OpenAI's text_similarity grader): for translations and summaries. judge: grader.judge or "
        "grader.judgeModel rates the answer 1-10 against the reference (the Benchmark's reference-guided MT-Bench "
        "prompt), or as grader.prompt asks (OpenAI's score_model grader), scaled to 0-1 ((rating - 1) / 9; an "
        "answer an API judge gives no rating after its re-asks scores 0): for answers no string check can grade. "
        "label: the judge (grader.judge or grader.judgeModel) is asked grader.prompt and picks one of grader.labels "
        "(OpenAI's label_model grader); an API judge's pick scores 1 when it is one of passingLabels, else 0 (as does "
        "no pick after its re-asks), and a local judge's reward is its probability of picking one of them: for a "
        "rubric, e.g. whether the answer is polite, on topic or follows a policy. python: "
        "grader.source's grade(sample, item) returns the reward (sample.output_text, the answer; sample.output_tools, "
        "the tool calls it makes, as OpenAI's; sample.output_reasoning, the reasoning before it). rewardModel: grader.rewardModel's score of the "
        "conversation (prompt and answer), on its own scale, as TRL's reward models. toolCalls: 1 when the answer "
        "makes exactly the tool calls expected, in any order (the same functions with equal arguments as JSON, "
        "none missing or extra: the Berkeley Function-Calling Leaderboard's AST check), else 0. The prompt is "
        "offered the row's tools (OpenAI's {tools}) through the model's chat template; the answer's calls are "
        "read as the template writes them (<tool_call> blocks, or JSON {name, arguments}); a malformed call "
        "scores 0. The calls expected: of a conversation ending with the assistant's turn (a fine-tuning row), "
        "its last turn that calls tools, the prompt the messages before it (without such a turn, its last turn, "
        "which calls none: an answer in words expected); of a prompt row, referenceField's list of OpenAI tool "
        "calls ([] for none)."))
    metric: Literal["fuzzy", "bleu", "gleu", "chrf", "meteor", "rouge1", "rouge2", "rouge3", "rouge4", "rouge5",
                    "rougeL", "cosine"] | None = Field(None, description=(
        "operation similarity: fuzzy, difflib's ratio of matching characters (case and runs of whitespace "
        "aside); bleu, sacrebleu's sentence BLEU (tokenized as its zh where the reference has Chinese "
        "characters, 13a elsewhere); gleu, nltk's sentence GLEU (Google's BLEU for single sentences: the "
        "lesser of n-gram precision and recall, n 1-4); chrf, sacrebleu's chrF, character n-grams, for any "
        "language and morphology (a good default for translations); meteor, nltk's METEOR (Hugging Face "
        "evaluate's): the harmonic mean of unigram precision and recall, recall weighed 9 to 1, words matched "
        "exactly, then by Porter stem, then as WordNet 3.0 synonyms (English; other languages match exactly), less "
        "a penalty for matches out of order (the runtime image carries WordNet; elsewhere the run fails at its "
        "start without it); rouge1 to rouge5, rougeL, rouge_score's "
        "F-measure of shared n-grams of 1 to 5 words (a text shorter than n words has none: 0), or of their "
        "longest common subsequence, for summaries (OpenAI's rouge_1 to rouge_5, rouge_l). BLEU "
        "aside, words are runs of letters and digits, each CJK character a word of its own. cosine: the cosine "
        "similarity of the two texts' embeddings by grader.embeddings or grader.embeddingModel, for meaning in "
        "other words (a paraphrase, another language), as OpenAI's cosine; below 0 (opposed, rare) it counts 0. "
        "Each scaled to 0-1."))
    extract: str | None = Field(None, min_length=1, max_length=1024, description=(
        "A regular expression (Python's) picking what of the answer is compared: its last match's first "
        "group (or the whole match without groups), e.g. '#### (.+)' for GSM8K's final-answer line or "
        "'\\\\boxed\\{(.+?)\\}'. An answer without a match scores 0, so the format is learned too. Unset: "
        "the whole answer."))
    judge: OpenAIEndpoint | None = Field(None, description=(
        "operations judge and label: the OpenAI-compatible judge (its key by apiKeySecret, "
        "LLMFACTORY_GRADER_API_KEY for local runs). Its ratings (labels) are cached in the store like the "
        "Benchmark judge's, so a resumed run gets the same rewards without paying again."))
    embeddings: EmbeddingsEndpoint | None = Field(None, description=(
        "metric cosine: the OpenAI-compatible embeddings endpoint (its key by apiKeySecret, "
        "LLMFACTORY_EMBEDDINGS_API_KEY for local runs). A step's answers and references go in one request; "
        "each text's embedding is cached in the store, so a reference is embedded once and a resumed run "
        "pays nothing again."))
    embedding_model: ModelSource | None = Field(None, description=(
        "metric cosine: a local embedding model instead of an endpoint, run with transformers in each training "
        "(or benchmarking) process on its GPU, as sentence-transformers encodes with it: each text after the "
        "prompt its config_sentence_transformers.json names default_prompt_name, its last hidden states pooled "
        "as its Pooling module says (mean, CLS or last token; mean without one), then through its Dense "
        "modules (of an encoder-decoder, its encoder's states: sentence-t5). E.g. BAAI/bge-m3, "
        "sentence-transformers/LaBSE. Its weights take GPU memory beside the "
        "model's, which the planner counts (32 texts of hyperparameters.maxSeqLength tokens at a time). Texts "
        "are cut at the model's own limit (sentence_bert_config.json's max_seq_length, else its tokenizer's); "
        "scores and the references' embeddings are cached in the store, as the endpoint's."))
    embedding_prompt: str | None = Field(None, max_length=1024, description=(
        "embeddingModel: the text put before each text instead of the model's default prompt, for a model that "
        "wants one and names none, e.g. 'query: ' for e5 models (their symmetric tasks' prefix); '' for none."))
    labels: list[Annotated[str, Field(min_length=1, max_length=64, pattern=pattern(r"^[^\[\]]+$", "a label without brackets"))]] | None = Field(
        None, min_length=2, max_length=10, description=(
            "operation label: the labels the judge picks one of (2-10, without brackets), e.g. [correct, "
            "incorrect] or [compliant, borderline, violation]; it answers in the form [[label]], case aside."))
    passing_labels: list[str] | None = Field(None, min_length=1, description=(
        "operation label: the labels (among grader.labels) that score 1."))
    prompt: str | None = Field(None, min_length=1, max_length=32768, description=(
        "operations label and judge: what the judge is asked, as OpenAI's label_model and score_model input: "
        "{{sample.output_text}} is the answer, {{prompt}} the prompt's last user message, {{item.<field>}} a "
        "field of the row (which every row must then hold; a list or an object as JSON). The runtime adds the "
        "labels and the answer format [[label]] after it (judge: the 1-10 scale and [[rating]]). A judge with "
        "a prompt reads no referenceField: the prompt shows the judge what it should see (a rubric, "
        "{{item.<field>}}). The planner refuses any other {{...}}. Required by label; judge unset: the "
        "MT-Bench prompt."))
    judge_model: TrainedModelSource | None = Field(None, description=(
        "operations judge and label: a local judge model instead of an API, run with transformers in each training "
        "(or benchmarking) process on its GPU, as the Benchmark's local judge: its rating is the expectation "
        "over its probabilities of writing 1..10 (a label's reward, its probability of writing a passing "
        "label), so it never fails to parse and costs one forward pass per answer. An instruction-tuned model "
        "that can grade (e.g. Qwen2.5-7B-Instruct, a Prometheus model); its "
        "weights take GPU memory beside the model's, which the planner counts. Its ratings are cached in the "
        "store, so a resumed run gets the same rewards without asking it again. For a judge too large to sit "
        "beside training, serve it with vLLM and name it in grader.judge instead."))
    reward_model: RewardModelSource | None = Field(None, description=(
        "operation rewardModel: a reward model (a transformers sequence-classification model with one "
        "label, e.g. Skywork-Reward-Llama-3.1-8B, one trained with TRL's RewardTrainer, or a FineTune's with "
        "objective reward, by fineTuneRef) whose output for "
        "the prompt and answer, rendered with its own chat template, is the reward, as TRL's GRPOTrainer "
        "uses one. It runs in each training (or benchmarking) process on its GPU, eight answers per forward "
        "pass (right-padded, each read at its last token, as transformers reads one alone); its weights take GPU memory beside the model's, which the planner counts."))
    source: str | None = Field(None, min_length=1, max_length=262144, description=(
        "operation python: Python source (OpenAI's python grader) defining grade(sample, item) that returns "
        "the reward as a number: sample is {\"output_text\": the answer, \"output_tools\": its tool calls, "
        "\"output_reasoning\": the reasoning before it}, item the dataset row with all its "
        "fields. It runs in a process of its own beside each training process, with the runtime image's "
        "packages and the Job's environment less its credentials (the store's keys, API keys, tokens), as it "
        "may run code a model wrote; it is no sandbox: what files and network the Job reaches, it reaches. A call may take "
        "60 s, and a grade that raises, runs longer or returns something other than a finite number fails "
        "the run with its traceback and the answer. It should be deterministic, "
        "so that a resumed run gets the rewards the interrupted one got. The planner refuses source that "
        "does not parse or defines no grade."))


class WeightedPart(GraderPart):
    """A part of a sum grader (grader.parts): its reward, weighted."""

    name: str = Field(min_length=1, max_length=40, pattern=pattern(r"^[a-z][a-z0-9_]*$", "a lowercase letter, then lowercase letters, digits and '_'"), description=(
        "Names the part's mean reward in progress.json (reward.<name>) and the trackers (train/rewards/<name>), "
        "as TRL logs each reward function's."))
    weight: float = Field(1.0, ge=-100, le=100, description=(
        "The part's weight in the sum (TRL's reward_weights); negative for a penalty."))


class Grader(GraderPart):
    """How a sampled answer is rewarded: one way of scoring it, or (operation sum) the weighted sum of
    several, as TRL's reward functions with their weights and OpenAI's multi grader do."""

    cel_rules: ClassVar = [
        *GraderPart.cel_rules,
        {"rule": "(self.operation == 'sum') == has(self.parts)",
         "message": "operation sum needs grader.parts (the graders whose weighted rewards it adds), which apply "
                    "to it alone"},
        {"rule": "!has(self.parts) || self.parts.all(p, self.parts.exists_one(q, q.name == p.name))",
         "message": "each of grader.parts needs a name of its own"},
        {"rule": "!has(self.parts) || self.parts.filter(p, has(p.judge)).size() <= 1",
         "message": "grader.parts may hold one API judge (grader.judge): its key reaches the Job as "
                    "LLMFACTORY_GRADER_API_KEY; local judges (judgeModel) need no key"},
        {"rule": "!has(self.parts) || self.parts.filter(p, has(p.embeddings)).size() <= 1",
         "message": "grader.parts may hold one embeddings endpoint (metric cosine): its key reaches the Job as "
                    "LLMFACTORY_EMBEDDINGS_API_KEY"},
    ]

    operation: Literal["equals", "contains", "icontains", "number", "math", "similarity", "judge", "label",
                       "python", "rewardModel", "toolCalls", "sum"] = Field(
        "equals", description=GraderPart.model_fields["operation"].description + (
            " sum: the weighted sum of grader.parts' rewards (e.g. a correctness check plus a format reward)."))
    parts: list[WeightedPart] | None = Field(None, min_length=2, max_length=8, description=(
        "operation sum: the graders whose rewards, each times its weight, make the reward; each reads the "
        "row's reference through its own referenceField."))


class OverlongPenalty(ApiModel):
    """DAPO's soft overlong punishment (Yu et al., 2025; TRL's get_soft_overlong_punishment): an answer
    that runs into the last bufferTokens before grpo.maxNewTokens loses reward in proportion to how
    far it ran, the whole penalty at maxNewTokens, so answers learn to end before they are cut."""

    buffer_tokens: int = Field(ge=1, le=131072, description=(
        "The stretch before maxNewTokens where the penalty grows from 0 to its whole (DAPO's L_cache: 4096 "
        "of 20480). An answer is counted with its end-of-turn token."))
    penalty: float = Field(1.0, gt=0, le=100, description=(
        "The reward lost at maxNewTokens (DAPO's 1, for rewards of -1 and 1): on the grader's scale, e.g. "
        "larger for a reward model's scores."))


class DynamicSampling(ApiModel):
    """DAPO's dynamic sampling (Yu et al., 2025); grpo.dynamicSampling says what it does."""

    oversampling: int = Field(3, ge=2, le=16, description=(
        "Prompts each step reads, as a multiple of the prompts it trains on (hyperparameters.batchSize x "
        "gradientAccumulation per process): the most it can sample to replace uniform groups (DAPO's 3)."))


class Grpo(ApiModel):
    """Group Relative Policy Optimization (Shao et al., 2024), as TRL's GRPOTrainer does it:
    reinforcement learning from a grader's rewards, without a value model."""

    cel_rules: ClassVar = [
        {"rule": "(!has(self.epsilonHigh) && self.epsilon == 0.2 && (!has(self.importanceSamplingLevel) "
                 "|| self.importanceSamplingLevel == 'token')) || self.iterations > 1",
         "message": "epsilon, epsilonHigh and importanceSamplingLevel shape the ratio to the sampling policy, which is 1 "
                    "unless iterations is above 1: set grpo.iterations"},
        {"rule": "(has(self.engine) && self.engine == 'vllm') || ((!has(self.vllmImportanceSamplingCorrection) "
                 "|| self.vllmImportanceSamplingCorrection) && (!has(self.vllmImportanceSamplingCap) "
                 "|| self.vllmImportanceSamplingCap == 2.0) && (!has(self.vllmImportanceSamplingMode) "
                 "|| self.vllmImportanceSamplingMode == 'token_truncate'))",
         "message": "grpo.vllmImportanceSamplingCorrection, vllmImportanceSamplingMode and vllmImportanceSamplingCap "
                    "apply only to grpo.engine vllm"},
        {"rule": "!has(self.offPolicyMaskThreshold) || self.iterations > 1 || (has(self.engine) && self.engine == 'vllm')",
         "message": "offPolicyMaskThreshold masks answers the policy has moved away from since they were sampled, "
                    "which only happens with grpo.iterations above 1 or grpo.engine vllm: set one of them"},
        {"rule": "!has(self.overlongPenalty) || self.overlongPenalty.bufferTokens < self.maxNewTokens",
         "message": "overlongPenalty.bufferTokens is the stretch before maxNewTokens where the penalty grows: "
                    "set it below grpo.maxNewTokens"},
    ]

    generations: int = Field(8, ge=2, le=256, description=(
        "Answers sampled per prompt (GRPO's group): each answer's advantage is its reward minus the "
        "group's mean, so a group whose answers all score the same teaches nothing. More answers find a "
        "passing one for harder prompts, at that many times the generation and training compute."))
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature of the answers (TRL's default 1).")
    top_p: float = Field(1.0, gt=0, le=1, description=(
        "Nucleus sampling: draw from the likeliest tokens whose probabilities add up to topP (TRL's top_p; 1: "
        "all). Below 1, the answers come from a narrower distribution than the policy's, which the loss "
        "treats as the policy's, as TRL does."))
    top_k: int = Field(0, ge=0, le=1000000, description="Draw from the topK likeliest tokens only (TRL's top_k; 0: all).")
    min_p: float = Field(0.0, ge=0, lt=1, description=(
        "Drop tokens less likely than minP times the likeliest one (TRL's min_p; 0: none)."))
    max_new_tokens: int = Field(256, ge=1, le=131072, description=(
        "Longest sampled answer, in tokens; the prompt and answer together are cut at "
        "hyperparameters.maxSeqLength."))
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description=(
        "What each answer's advantage (its reward minus its group's mean) is divided by, as TRL's "
        "scale_rewards. group (GRPO's): the standard deviation of its group's rewards. batch: that of "
        "every reward of the step, all processes (Lite PPO's, in \"Tricks or Traps?\", 2025: a group of "
        "near-equal rewards keeps its small advantages, which group would magnify). none: unscaled, as Dr. "
        "GRPO (Liu et al., 2025) advises against group's bias toward too-easy and too-hard prompts."))
    beta: float = Field(0.0, ge=0, le=10, description=(
        "Weight of the KL penalty that keeps the model near its reference (the base before training: the "
        "adapter switched off), per answer token with the k3 estimator, as DeepSeekMath (0.04) and TRL do. 0 "
        "(TRL's default, as DAPO and Dr. GRPO advise) has none and needs no reference pass. Above 0 it needs "
        "method lora or qlora, whose base is the reference without a second copy of the model."))
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = Field("dapo", description=(
        "How the step's loss is normalized, as TRL's loss_type. dapo (TRL's default): summed over every "
        "answer token of the step and divided by their number, so every token weighs the same. grpo "
        "(DeepSeekMath's): each answer's mean over its tokens, averaged over the answers, which weighs a "
        "long answer's tokens less (a bias toward long wrong answers, Dr. GRPO shows). dr_grpo: summed and "
        "divided by answers x maxNewTokens, a constant."))
    mask_truncated: bool = Field(False, description=(
        "Leave answers that never ended (cut at maxNewTokens or hyperparameters.maxSeqLength) out of the "
        "loss, as DAPO's overlong filtering and TRL's mask_truncated_completions: an unfinished answer's "
        "reward says little about its tokens. Their rewards still count in their group's mean. The share "
        "cut is in progress.json's truncated either way."))
    overlong_penalty: OverlongPenalty | None = Field(None, description=(
        "DAPO's soft overlong punishment, added to the grader's reward of each sampled answer (the step's "
        "reward in progress.json includes it, its mean apart as reward.overlongPenalty; the validation "
        "reward is the grader's alone). Unset: none. Where maskTruncated leaves cut answers out of the "
        "loss, this teaches the answers that still fit to end sooner."))
    dynamic_sampling: DynamicSampling | None = Field(None, description=(
        "DAPO's dynamic sampling (Yu et al., 2025): a group whose answers all scored alike (all passed, all "
        "failed) has no advantage and teaches nothing, so it is replaced by a fresh prompt's group before the "
        "step trains. Each step reads oversampling times its prompts from the train split; the first share is "
        "sampled as without it, then, round after round, as many of the rest as groups were uniform are "
        "sampled together and take their places, until none is or the step's prompts are spent (a group still "
        "uniform then trains with no advantage, as without it). Prompts a step leaves unsampled are not seen "
        "in that epoch: an epoch has oversampling times fewer steps, each of groups to learn from. "
        "progress.json's promptsSampled counts a step's prompts sampled; its reward, answerLength and truncated "
        "are of every answer sampled, uniformGroups the share of the groups trained. Unset: none (uniform "
        "groups train with no advantage, their share in uniformGroups)."))
    # Optional, not defaulted: a GRPO FineTune planned before these settings came keeps its task digest
    # (and so its finished run), as every field that is unset leaves it.
    log_completions: int | None = Field(None, ge=1, le=256, description=(
        "Each step, write the answers sampled to this many of its prompts (the first of every process's, in rank "
        "order), each with "
        "its reward (a sum grader's parts too), advantage and whether it was cut, to completions/step-<N>.jsonl "
        "in the run's artifacts (status.result.completionsUri), and as a table in each of spec.tracking's trackers "
        "(W&B's completions, a TensorBoard text, MLflow's completions/step-<N>.json), as TRL's log_completions: read "
        "them to see what the policy learns to write, and whether it games the grader. Unset: none."))
    prompt_order: Literal["shuffled", "easyFirst"] | None = Field(None, description=(
        "The order of each epoch's prompts. shuffled (unset): a seeded shuffle (hyperparameters.seed), as every "
        "objective's. easyFirst: a curriculum, the shuffled prompts ordered by their pass_rate, highest first "
        "(the prompts the student already solves most often early, the hardest last, every epoch): a "
        "DatasetBuild's difficulty measures it and writes it in every row, and the planner refuses a build "
        "without difficulty; a row of a dataset.uri without a pass_rate (0-1) fails the run before the model loads."))
    iterations: int = Field(1, ge=1, le=16, description=(
        "Optimizer steps on each batch of sampled answers (TRL's num_iterations, GRPO's mu): more learning "
        "per sampling, which dominates a step's time. From the second on, each answer token's ratio to the "
        "policy that sampled it is clipped to [1 - epsilon, 1 + epsilonHigh] (PPO's surrogate), so the "
        "policy cannot run far from the answers it learns from. The learning-rate schedule counts these "
        "optimizer steps; checkpoints and steps count batches of samples."))
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip range of the ratio with iterations above 1 (TRL's 0.2).")
    epsilon_high: float | None = Field(None, gt=0, le=10, description=(
        "Upper clip range of the ratio; unset: epsilon. DAPO's clip-higher (0.28) leaves room for unlikely "
        "tokens of good answers to gain, against entropy collapse."))
    importance_sampling_level: Literal["token", "sequence"] = Field("token", description=(
        "Where the ratio to the sampling policy (iterations above 1) is taken, as TRL's importance_sampling_level. "
        "token: each answer token's own (PPO's, GRPO's). sequence: the answer's, the geometric mean of its tokens' "
        "ratios, the same for all its tokens and clipped as one: GSPO (Zheng et al., 2025), which trained Qwen3, "
        "steadier for long answers and mixture-of-experts models; its paper clips far tighter (epsilon 3e-4, "
        "epsilonHigh 4e-4). On a step's first update both give the same loss and gradient."))
    top_entropy_quantile: float = Field(1.0, gt=0, le=1, description=(
        "Take the policy term on the high-entropy answer tokens only: those whose entropy (of the model's "
        "next-token distribution where it predicts the token) is in the top topEntropyQuantile of the "
        "micro-batch's answer tokens on all processes, as TRL's top_entropy_quantile. \"Beyond the 80/20 Rule\" "
        "(Wang et al., 2025) found these forks of an answer carry what reinforcement learning teaches: with 0.2 "
        "it matched training on every token for Qwen3-8B and beat it for 14B and 32B. 1: every token. The KL term "
        "(beta) stays on every token and the loss is normalized as without it. The tokens ranked are those of "
        "the answers trained (with an advantage, or all with beta), where TRL's include uniform groups'. "
        "progress.json's entropy is the mean per answer token trained, either way: a falling one is the policy "
        "collapsing onto few answers."))
    off_policy_mask_threshold: float | None = Field(None, gt=0, le=100, description=(
        "DeepSeek-V3.2's off-policy sequence masking, as TRL's off_policy_mask_threshold: an answer with a negative "
        "advantage is left out of the policy term (its KL term stays) when the mean over its tokens of log p_sampled "
        "- log p_current is above this, p_sampled being vLLM's (engine vllm) or the step's first update's. Pushing "
        "down a wrong answer the policy has already moved away from teaches little and destabilizes training. Answers "
        "are off the policy only with iterations above 1 or engine vllm. The paper gives no value; TRL's "
        "documentation shows 0.5. Unset: none. progress.json's offPolicyMasked is the share of the answers trained "
        "that it masked, over the step's updates."))
    grader: Grader = Field(default_factory=Grader, description="How each sampled answer is rewarded.")
    engine: Literal["transformers", "vllm"] = Field("transformers", description=(
        "What samples the answers, as TRL's use_vllm. transformers: the training model's own generate, in the "
        "training process. vllm: a `vllm serve` beside each training process (on its GPU, or a CPU build of "
        "vLLM), started before the model loads, which serves the base model with the adapter as it is after "
        "each step (saved and loaded by vLLM's LoRA API), or for method full with the weights as they are (saved "
        "to the pod's temporary folder, 2 bytes a parameter, and reloaded in place by vLLM): continuous batching "
        "and paged attention on the GPU, where "
        "sampling is most of a step (on 2 CPU cores its CPU build sampled no faster than transformers: "
        "benchmarks/RESULTS.md). It takes a share of the GPU "
        "(the planner counts the base model again in 16 bits, a KV cache for batchSize x generations answers "
        "of maxSeqLength, and vLLM's own 2 GiB). Adapters without lora.dora, of rank up to "
        "512; a base vLLM loads (not a GGUF file) with the chat markers in its vocabulary; for qlora vLLM "
        "serves the base unquantized, so the answers come from a policy a little off the trained one (as "
        "with TRL). Validation rewards are the training model's own greedy answers either way."))
    vllm_importance_sampling_correction: bool = Field(True, description=(
        "With engine vllm, weigh each answer token's loss by min(p_train / p_vllm, vllmImportanceSamplingCap), "
        "the training model's probability of the token over vLLM's (truncated importance sampling, as TRL's "
        "vllm_importance_sampling_correction): vLLM's kernels, and for qlora its unquantized base, give "
        "probabilities a little off the trained policy's, and the answers are vLLM's. Their mean "
        "|log p_train - log p_vllm| per token is progress.json's samplerLogpDiff."))
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "token_truncate", description=(
            "How the correction weighs, as TRL's vllm_importance_sampling_mode: token_* each answer token by its own "
            "ratio, sequence_* every token of an answer by the answer's (the product of its tokens' ratios, so it "
            "drifts from 1 as answers grow long); *_truncate a ratio above vllmImportanceSamplingCap counts as the cap "
            "(truncated importance sampling), *_mask counts as 0, leaving the token (the answer) out of the gradient "
            "(masked importance sampling, IcePop's; the Qwen team found sequence_mask the most stable). TRL now "
            "defaults to sequence_mask with a cap of 3; token_truncate (TRL's first default, OLMo's RL recipe) stays "
            "the default here, since a whole answer's ratio drifts exponentially with its length where the engines "
            "differ in 16 bits and has no lower bound. The share of trained answer tokens masked is progress.json's "
            "samplerMasked."))
    vllm_importance_sampling_cap: float = Field(2.0, ge=1, le=100, description=(
        "Largest importance ratio the correction keeps (TRL's 2): above it, a token's or answer's weight is the "
        "cap (*_truncate modes) or 0 (*_mask modes)."))


class Hyperparameters(ApiModel):
    cel_rules: ClassVar = [
        {"rule": "!has(self.earlyStopping) || has(self.evalEverySteps)",
         "message": "earlyStopping needs evalEverySteps: the validation loss it watches is computed that often"},
        {"rule": "!has(self.warmupSteps) || !has(self.maxSteps) || self.warmupSteps < self.maxSteps",
         "message": "warmupSteps must be fewer than maxSteps: the learning rate would never reach its peak"},
        {"rule": "!has(self.minLearningRateRatio) || !has(self.lrScheduler) || self.lrScheduler != 'constant'",
         "message": "minLearningRateRatio is where linear and cosine decay end: lrScheduler constant does not decay"},
        {"rule": "!has(self.selectBest) || !self.selectBest || has(self.evalEverySteps)",
         "message": "selectBest needs evalEverySteps: the best weights are chosen among the evaluations"},
    ]

    epochs: int = Field(1, ge=1, le=1000, description="Passes over the train split.")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description=(
        "Optimizer steps to train, instead of epochs (HF Trainer's max_steps, which overrides "
        "num_train_epochs): the train split is read for as many epochs as the steps take, reshuffled "
        "each time, the last cut short; warmup and decay span these steps. Unset: the epochs' steps."))
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (AdamW).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps with linear warmup.")
    warmup_steps: int | None = Field(None, ge=0, description=(
        "Optimizer steps of linear warmup, instead of warmupRatio's share (HF Trainer's warmup_steps); "
        "fewer than the run's steps, which the runtime checks once it has counted them."))
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description=(
        "The learning rate after warmup: linear decay to zero (HF Trainer's and OpenAI's), cosine decay "
        "to zero (Axolotl's and torchtune's usual choice), or constant."))
    min_learning_rate_ratio: float | None = Field(None, ge=0, lt=1, description=(
        "Linear and cosine decay end at this share of learningRate instead of zero (HF Trainer's "
        "cosine_with_min_lr, Axolotl's cosine_min_lr_ratio; continued pre-training recipes keep 0.1). "
        "Unset: 0."))
    weight_decay: float = Field(0.0, ge=0, description=(
        "AdamW weight decay, of matrices only: norms, biases and DoRA's magnitudes are spared, as HF "
        "Trainer and nanoGPT spare them (a decayed norm's gain shrinks towards 0, not the 1 it starts at)."))
    optimizer: Literal["adamw", "adamw8bit"] | None = Field(None, description=(
        "adamw: PyTorch's AdamW, its two moments in fp32 (8 bytes a trainable parameter). adamw8bit: "
        "bitsandbytes' AdamW8bit (HF Trainer's and Axolotl's adamw_bnb_8bit), the moments quantized blockwise "
        "to 8 bits (2 bytes a parameter; Dettmers et al., 2022, learning as 32-bit Adam does): for a full "
        "fine-tune, whose moments are its largest state (Llama-3-8B: 60 GiB in fp32, 15 in 8 bits; the "
        "estimate counts them). Under strategy ddp; DeepSpeed steps its own AdamW, sharding the moments "
        "instead. Unset: adamw."))
    batch_size: int = Field(4, ge=1, le=4096, description=(
        "Sequences per micro-batch per process (packed sequences of maxSeqLength when packing is on; with "
        "objective dpo, sequences of whole pairs, up to twice maxSeqLength)."))
    gradient_accumulation: int = Field(1, ge=1, le=1024, description=(
        "Micro-batches per optimizer step. The global batch is batchSize x gradientAccumulation x processes."))
    max_seq_length: int = Field(1024, ge=16, le=1048576, description=(
        "Tokens per sequence; longer conversations are cut (counted in result.truncatedRows and the headline; "
        "one whose answers start past it is left out, result.rowsLeftOut), longer raw text (rows {text}) is split "
        "into pieces of this many tokens, each trained on."))
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for initialisation, dropout and shuffling.")
    packing: bool = Field(True, description=(
        "Pack several conversations into each sequence (attention and positions kept apart), so "
        "compute is not spent on padding."))
    eval_every_steps: int | None = Field(None, ge=1, description=(
        "Also compute the loss on the validation split every this many optimizer steps (progress.json, "
        "trackers' eval/loss, the eval_loss column of metrics/loss.csv and the plot); by default only "
        "after training. Training goes on exactly as without it."))
    early_stopping: EarlyStopping | None = Field(None, description=(
        "Stop training once the validation loss has not improved for `patience` evaluations; the "
        "outputs are then the best evaluation's weights (as with selectBest). Needs evalEverySteps."))
    select_best: bool = Field(False, description=(
        "Save as the adapter and model the weights of the evaluation with the lowest validation loss "
        "(the final one included), not the last step's (HF Trainer's load_best_model_at_end). A "
        "checkpoint is saved at each new best and kept beside the last checkpointing.keepLast ones. "
        "Needs evalEverySteps."))
    neftune_noise_alpha: float | None = Field(None, gt=0, le=1000, description=(
        "NEFTune (Jain et al., 2023): add uniform noise of at most alpha/sqrt(L x d) to the input embeddings "
        "in training steps (L the sequence's length, the packed one with packing; d the hidden size), as "
        "HF Trainer's neftune_noise_alpha does; 5 is the paper's usual value. Evaluation sees none."))
    loss_on: Literal["assistant", "all"] | None = Field(None, description=(
        "objective sft: the tokens the loss is on. assistant (unset): the assistant turns and their end-of-turn "
        "markers only, as Axolotl's train_on_inputs false and TRL's assistant_only_loss. all: every token of "
        "the rendered conversation, system and user turns and the template's markup too (Axolotl's "
        "train_on_inputs true, TRL's SFTTrainer default): for continued pre-training on conversations, or a "
        "model that should also learn to write the prompts. The validation loss is on the same tokens; a "
        "Benchmark's perplexity reports both kinds either way. Raw-text rows ({text}) are learned on every "
        "token either way."))
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% more compute.")
    fused_kernels: bool = Field(False, description=(
        "Liger's fused Triton kernels for Llama-family models (RMSNorm, SwiGLU, RoPE, and linear + "
        "cross-entropy without materialising the logits, which the memory estimate credits for objective sft): "
        "less memory, room for a larger batchSize; its speed varies (on one H100: QLoRA 5% faster, bf16 LoRA "
        "19% slower). CUDA only; not under distribution.zeroStage 3."))
    compile: bool = Field(False, description=(
        "torch.compile each decoder layer: norms, activations, RoPE and residual adds fused into fewer "
        "kernels. One graph serves every layer, compiled at the start of each attempt (and again for "
        "evaluation). "
        "Dropout draws its random numbers differently when compiled, so the loss curve differs "
        "slightly from an uncompiled run's. Under DeepSpeed ZeRO 3 its parameter hooks make the layers "
        "recompile up to torch's limit, after which they run uncompiled."))
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description=(
        "Weights and compute dtype: auto is bf16 on GPUs that have it (Ampere and later), fp16 on older "
        "GPUs, fp32 on CPU. Adapters run in it too. In bf16 and fp16 the optimizer updates fp32 master "
        "copies of the trained weights (a full fine-tune's or the adapters'), as DeepSpeed does (16-bit "
        "weights cannot take small updates); fp16 also scales "
        "the loss so small gradients survive, and skips a step whose gradients overflow "
        "(result.skippedSteps). fp16 is slow on CPU, and under DeepSpeed needs a GPU."))


class Distribution(ApiModel):
    """How several processes share the work (resources.gpusPerNode x resources.nodes)."""

    cel_rules: ClassVar = [
        {"rule": "self.strategy == 'deepspeed' || (!has(self.zeroStage) && !has(self.offload))",
         "message": "zeroStage and offload apply only to strategy deepspeed"},
    ]

    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description=(
        "ddp replicates the model on every process; deepspeed shards optimizer state (ZeRO 2) "
        "and also weights (ZeRO 3)."))
    zero_stage: Literal[2, 3] | None = Field(None, description="DeepSpeed ZeRO stage (deepspeed only; default 2).")
    offload: Literal["none", "cpu"] | None = Field(None, description="Keep optimizer state in CPU memory (deepspeed only).")

    @model_validator(mode="after")
    def _deepspeed_defaults(self):
        if self.strategy == "deepspeed":
            self.zero_stage = self.zero_stage or 2
            self.offload = self.offload or "none"
        return self


class Checkpointing(ApiModel):
    """Training state saved to the artifact store, so a preempted or killed run resumes where it was."""

    every_steps: int = Field(100, ge=1, description=(
        "Save every this many optimizer steps (and on SIGTERM, and after the last step, so a pod stopped while it "
        "evaluates, merges and uploads resumes there; that last one holds no optimizer state: under DeepSpeed "
        "ZeRO 3 its shards keep the fp32 weights, not Adam's moments)."))
    keep_last: int = Field(2, ge=1, le=100, description="Committed checkpoints kept; older ones are deleted.")


class WandB(ApiModel):
    project: str = Field(min_length=1, description="Weights & Biases project.")
    entity: str | None = Field(None, description="Team or user; the key's default when unset.")
    mode: Literal["online", "offline"] = Field("online", description="offline writes runs to the artifact store only.")
    api_key_secret: SecretKeyRef | None = Field(None, description="Secret holding WANDB_API_KEY (online mode).")


class MLflow(ApiModel):
    cel_rules: ClassVar = [no_credentials_in_url("trackingUri")]

    tracking_uri: str = Field(min_length=1, max_length=2048, description=(
        "MLflow tracking server URI (or a file:// path). A resumed run logs to the same MLflow run (its id "
        "is in tracking/)."))
    experiment: str = Field("llmfactory", min_length=1, description="Experiment name.")
    api_key_secret: SecretKeyRef | None = Field(None, description=(
        "Secret holding the server's token (MLFLOW_TRACKING_TOKEN: Databricks, or a server behind token auth)."))


class Tracking(ApiModel):
    """Where training metrics are reported besides progress.json and metrics/loss.csv."""

    tensorboard: bool = Field(False, description="Write TensorBoard event files under tracking/tensorboard/ in the "
                                                 "artifacts; each checkpoint carries them, so a resumed run continues "
                                                 "the curve.")
    wandb: WandB | None = Field(None, description="Report to Weights & Biases.")
    mlflow: MLflow | None = Field(None, description="Report to MLflow.")


# A CEL condition: the spec's pods get no GPU.
ON_CPU = "(has(self.resources) && has(self.resources.gpusPerNode) && self.resources.gpusPerNode == 0)"


class FineTuneSpec(RunOptions):
    cel_rules: ClassVar = [
        {"rule": "!has(self.hyperparameters) || !has(self.hyperparameters.optimizer) "
                 "|| self.hyperparameters.optimizer == 'adamw' || !has(self.distribution) "
                 "|| self.distribution.strategy != 'deepspeed'",
         "message": "hyperparameters.optimizer adamw8bit runs under distribution.strategy ddp: DeepSpeed steps its "
                    "own AdamW and shards the moments instead (zeroStage 2 or 3)"},
        {"rule": "(has(self.chatTemplate) && self.chatTemplate == 'jinja') == has(self.chatTemplateJinja)",
         "message": "chatTemplateJinja is the template of chatTemplate jinja: set both, or neither"},
        {"rule": "!has(self.chatTemplateTokens) || (has(self.chatTemplate) && self.chatTemplate == 'jinja')",
         "message": "chatTemplateTokens are the markers of chatTemplate jinja (chatml's and llama3's are known)"},
        {"rule": "self.method != 'full' || !has(self.lora)", "message": "lora settings apply only to methods lora and qlora"},
        {"rule": "self.method == 'qlora' || !has(self.qlora)", "message": "qlora settings apply only to method qlora"},
        {"rule": "self.method != 'qlora' || !has(self.distribution) || self.distribution.strategy != 'deepspeed'",
         "message": "qlora trains with distribution.strategy ddp: DeepSpeed ZeRO cannot shard 4-bit weights"},
        {"rule": "self.method == 'full' || !has(self.distribution) || !has(self.distribution.zeroStage) "
                 "|| self.distribution.zeroStage != 3",
         "message": "distribution.zeroStage 3 shards the weights of a full fine-tune; adapters (lora) use zeroStage 2"},
        {"rule": "(has(self.objective) && self.objective == 'dpo') || !has(self.dpo)",
         "message": "dpo settings apply only to objective dpo"},
        {"rule": "(has(self.objective) && self.objective == 'kto') || !has(self.kto)",
         "message": "kto settings apply only to objective kto"},
        {"rule": "(has(self.objective) && self.objective == 'grpo') || !has(self.grpo)",
         "message": "grpo settings apply only to objective grpo"},
        {"rule": "(has(self.objective) && self.objective == 'reward') || !has(self.reward)",
         "message": "reward settings apply only to objective reward"},
        {"rule": "!has(self.objective) || self.objective != 'grpo' || !has(self.hyperparameters) "
                 "|| (!has(self.hyperparameters.earlyStopping) && (!has(self.hyperparameters.selectBest) "
                 "|| !self.hyperparameters.selectBest))",
         "message": "objective grpo has no validation loss for hyperparameters.earlyStopping or selectBest to "
                    "choose by (its evaluations report the grader's mean reward)"},
        {"rule": "self.method != 'full' || !has(self.grpo) || !has(self.grpo.beta) || self.grpo.beta == 0.0",
         "message": "grpo.beta above 0 needs method lora or qlora: the reference is the base with the adapter "
                    "switched off (a full fine-tune would need a second copy of the model)"},
        {"rule": "!has(self.grpo) || !has(self.grpo.engine) || self.grpo.engine != 'vllm' || !has(self.lora) "
                 "|| ((!has(self.lora.dora) || !self.lora.dora) && (!has(self.lora.r) || self.lora.r <= 512))",
         "message": "grpo.engine vllm cannot serve a DoRA adapter or one of rank above 512 (vLLM's largest): "
                    "set lora.dora false and lora.r at most 512, or use engine transformers"},
        {"rule": "!has(self.grpo) || !has(self.grpo.engine) || self.grpo.engine != 'vllm' || !has(self.lora) "
                 "|| !has(self.lora.trainEmbeddings) || !self.lora.trainEmbeddings",
         "message": "grpo.engine vllm cannot serve an adapter that trains the embeddings whole (lora.trainEmbeddings): "
                    "use engine transformers"},
        {"rule": "!has(self.grpo) || !has(self.grpo.engine) || self.grpo.engine != 'vllm' "
                 "|| !has(self.baseModel.ggufFile)",
         "message": "grpo.engine vllm cannot load a GGUF base model (baseModel.ggufFile): use engine transformers"},
        {"rule": "!has(self.objective) || self.objective != 'grpo' || !has(self.distribution) "
                 "|| !has(self.distribution.zeroStage) || self.distribution.zeroStage != 3",
         "message": "objective grpo samples answers on each process on its own, which ZeRO 3's collective "
                    "forwards cannot: use distribution.zeroStage 2 or strategy ddp"},
        {"rule": "!has(self.hyperparameters) || !has(self.hyperparameters.fusedKernels) "
                 "|| !self.hyperparameters.fusedKernels || !has(self.distribution) "
                 "|| !has(self.distribution.zeroStage) || self.distribution.zeroStage != 3",
         "message": "hyperparameters.fusedKernels cannot run under distribution.zeroStage 3: Liger's fused linear + "
                    "cross-entropy reads the output layer's weight directly, of which ZeRO 3 leaves each process "
                    "only its shard; use zeroStage 2 or set fusedKernels false"},
        {"rule": "!has(self.hyperparameters) || !has(self.hyperparameters.lossOn) || !has(self.objective) "
                 "|| self.objective == 'sft'",
         "message": "hyperparameters.lossOn applies to objective sft: dpo, kto and reward compare answers, and grpo "
                    "trains on its sampled answers"},
        {"rule": f"!{ON_CPU} || !has(self.hyperparameters) || !has(self.hyperparameters.fusedKernels) "
                 "|| !self.hyperparameters.fusedKernels",
         "message": "hyperparameters.fusedKernels are Triton kernels for a CUDA GPU, and resources.gpusPerNode is 0: "
                    "set fusedKernels false"},
        {"rule": f"!{ON_CPU} || !has(self.hyperparameters) || !has(self.hyperparameters.precision) "
                 "|| self.hyperparameters.precision != 'fp16' || !has(self.distribution) "
                 "|| self.distribution.strategy != 'deepspeed'",
         "message": "hyperparameters.precision fp16 under distribution.strategy deepspeed needs a GPU (DeepSpeed has "
                    "no fp16 on CPU), and resources.gpusPerNode is 0: use bf16 or fp32, or strategy ddp"},
    ]

    base_model: BaseModel = Field(description="The model to fine-tune.")
    dataset: DatasetInput = Field(description="The conversations to train on.")
    chat_template: Literal["model", "chatml", "llama3", "jinja"] = Field("model", description=(
        "How conversations are rendered, and saved with the tokenizer for whatever loads the result "
        "(Benchmark, Quantization, vLLM, llama.cpp). model: the base model's own template, or ChatML where "
        "it has none (a base model: Llama-3-8B, Mistral-7B-v0.1). chatml or llama3: that template even "
        "where the model has one, as Axolotl's chat_template, e.g. for a template that refuses a system "
        "message (Mistral-7B-Instruct-v0.1's, Gemma's), or Llama 3's on a Llama 3 base. jinja: a template "
        "of your own, chatTemplateJinja, with its markers in chatTemplateTokens. Markers the "
        "vocabulary lacks (ChatML's <|im_start|> and <|im_end|>) become tokens, and markers the base never "
        "trained (Llama-3-8B base's <|eot_id|>, whose rows are zeros) start as the mean of the trained rows: "
        "LoRA and QLoRA train those rows beside the adapters."))
    chat_template_jinja: str | None = Field(None, min_length=1, max_length=65536, description=(
        "chatTemplate jinja: the template, in the Jinja of a tokenizer's chat_template (rendered as "
        "transformers does, with messages, add_generation_prompt, bos_token and eos_token). It must write an "
        "answer where the conversation before it, with the generation prompt, ended, for the loss to find "
        "it; one that writes earlier turns otherwise (Qwen3's drops their reasoning) has each answer learned "
        "after the conversation before it as it writes it then. The planner parses it; the runtime renders a "
        "conversation with it before it reads any data."))
    chat_template_tokens: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None, max_length=64, description=(
            "chatTemplate jinja: the markers the template writes that must each be one token (<|user|>, "
            "<|end|>, ...), above all the one that closes an answer, which generation stops on: added as "
            "special tokens where the vocabulary lacks them, and trained as chatml's are. A marker left out "
            "is ordinary text, several tokens a model cannot stop on."))
    method: Literal["lora", "qlora", "full"] = Field("lora", description=(
        "lora trains an adapter on the frozen base; qlora does so on a 4-bit quantized base "
        "(bitsandbytes); full trains every weight."))
    objective: Literal["sft", "dpo", "kto", "grpo", "reward"] = Field("sft", description=(
        "sft learns the assistant answers of conversations (supervised fine-tuning); dpo learns from "
        "preference pairs, a chosen and a rejected answer to the same prompt, to make the chosen one "
        "more likely than the rejected one relative to the base model (Direct Preference Optimization). "
        "dpo reads a DatasetBuild with preferences, or rows at dataset.uri in OpenAI's preference format "
        "({input: {messages}, preferred_output, non_preferred_output}) or TRL's ({prompt, chosen, "
        "rejected}, or chosen and rejected conversations sharing their prompt). With dpo, maxSeqLength "
        "bounds each of the two conversations and a pair's two share a sequence (of up to twice "
        "maxSeqLength); the loss curves show the preference loss (dpo.loss; DPO's starts at ln 2 = 0.693), "
        "plus dpo.sftWeight's term. kto learns from answers labelled desirable or undesirable one by one "
        "(Kahneman-Tversky Optimization: feedback such as thumbs up and down, without pairs): rows at "
        "dataset.uri in TRL's unpaired form ({prompt, completion, label}, label true for a desirable "
        "answer), or preference pairs (a DatasetBuild with preferences, or rows in OpenAI's or TRL's form), "
        "each giving its chosen answer as desirable and its rejected one as undesirable. Its loss starts "
        "at half the examples' weight (0.5 with kto's default weights). grpo learns by reinforcement from "
        "a grader (Group Relative Policy Optimization, as OpenAI's reinforcement fine-tuning and TRL's "
        "GRPOTrainer): for each prompt it samples grpo.generations answers, scores each against the row's "
        "reference answer (grpo.grader), and makes the answers that score above their group's mean more "
        "likely; rows at dataset.uri hold the prompt (messages ending with a user turn, or prompt) and the "
        "reference (OpenAI's {messages, <field>: ...}). batchSize counts prompts; its loss hovers near 0, "
        "the curve to watch is the mean reward (metrics/loss.csv, progress.json). reward trains a reward "
        "model (TRL's RewardTrainer) on the preference pairs dpo reads: the model with its output layer "
        "replaced by one score per conversation (a transformers sequence-classification model with one "
        "label, the score read at the conversation's last token), trained so that the chosen answer scores "
        "above the rejected one (loss -log sigmoid(difference), starting near ln 2 = 0.693; a row's margin, "
        "TRL's optional column, is subtracted from the difference, as Llama 2's margin loss); what it saves "
        "is what grader.rewardModel of a GRPO FineTune or Benchmark reads (fineTuneRef), and what a "
        "Benchmark's ranking scores held-out pairs with. Each conversation "
        "is a row of its own (no packing); maxSeqLength bounds each."))
    reward: Reward | None = Field(None, description=(
        "Reward model settings (objective reward); defaults apply when unset."))
    dpo: Dpo | None = Field(None, description=(
        "Preference settings (objective dpo): the loss (DPO or a variant) and its strength; defaults apply when unset."))
    kto: Kto | None = Field(None, description=(
        "KTO settings (objective kto): its strength and the weights of desirable and undesirable examples; "
        "defaults apply when unset."))
    grpo: Grpo | None = Field(None, description=(
        "GRPO settings (objective grpo): answers sampled per prompt and the grader; defaults apply when unset."))
    lora: Lora | None = Field(None, description="Adapter settings (lora, qlora); defaults apply when unset.")
    qlora: QLora | None = Field(None, description="4-bit quantization of the base (qlora); defaults apply when unset.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Training settings.")
    distribution: Distribution = Field(default_factory=Distribution, description="Multi-process training.")
    checkpointing: Checkpointing = Field(default_factory=Checkpointing, description="Saving and resuming training state.")
    tracking: Tracking = Field(default_factory=Tracking, description="Experiment trackers.")
    merge_adapter: bool = Field(True, description=(
        "Also save the adapter merged into its base as a whole model (what Benchmark and "
        "Quantization use). Applies to lora and qlora."))
    benchmark_ref: LocalObjectReference | None = Field(None, description=(
        "Train only once this Benchmark has succeeded, i.e. passed its gates (one whose gates fail never "
        "succeeds: this FineTune keeps waiting), as a Quantization's benchmarkRef: e.g. GRPO against a reward "
        "model only once a Benchmark of it ranks held-out pairs well enough. A gate, not an input: setting it "
        "does not make a finished FineTune run again."))
    resources: Resources = Field(default_factory=Resources, description="Compute for the training Job.")

    @model_validator(mode="after")
    def _method_defaults(self):
        # Spelled out in the task, so the digest changes if a default ever does. (What may be set
        # with what is the CEL rules' to say: the planner checks them as the API server does.)
        if self.objective == "dpo" and self.dpo is None:
            self.dpo = Dpo()
        if self.objective == "kto" and self.kto is None:
            self.kto = Kto()
        if self.objective == "grpo" and self.grpo is None:
            self.grpo = Grpo()
        if self.objective == "reward" and self.reward is None:
            self.reward = Reward()
        if self.method in ("lora", "qlora") and self.lora is None:
            self.lora = Lora()
        if self.method == "qlora" and self.qlora is None:
            self.qlora = QLora()
        return self


class FineTuneResult(ApiModel):
    model_uri: str | None = Field(None, description=(
        "Whole model (adapter merged into the base, or fully trained): safetensors, tokenizer, chat "
        "template, generation config, model card. Absent when mergeAdapter is false."))
    adapter_uri: str | None = Field(None, description="LoRA adapter (methods lora and qlora), with tokenizer and model card.")
    base_model: ModelSource = Field(description="The model that was fine-tuned.")
    base_fine_tune: str | None = Field(None, description=(
        "The FineTune whose model it was (spec.baseModel.fineTuneRef): a chain's model has the shape of its first "
        "FineTune's base, which the planner estimates the next one by."))
    objective: str | None = Field(None, description=(
        "What it trained with (spec.objective): reward for a reward model, which scores conversations "
        "rather than writing them."))
    dataset_uri: str = Field(description="Dataset the model was trained on.")
    dataset_format: str = Field(description="Row format of the dataset.")
    dataset_digest: str = Field(description="Digest of the dataset.")
    completions_uri: str | None = Field(None, description=(
        "grpo.logCompletions: the answers sampled each step, one JSONL file a step (step-<N>.jsonl)."))
    dataset_reference_fields: list[str] | None = Field(None, description=(
        "objective grpo: the fields in which every row (of every split) holds a string or a number, where a Benchmark's "
        "reward grader (reading these prompts) may find its reference answer (referenceField)."))
    digest: str = Field(description="sha256 over the saved weights (merged model, else adapter).")
    first_loss: float = Field(description="Mean train loss of the first steps (ten, or a third of a shorter run).")
    final_loss: float = Field(description="Mean train loss of the last steps (ten, or a third of a shorter run).")
    eval_loss: float | None = Field(None, description=(
        "Loss on the validation split after training (the DPO loss with objective dpo, KTO's with kto, the "
        "pair loss with reward)."))
    steps: int = Field(description="Optimizer steps.")
    truncated_rows: int | None = Field(None, description=(
        "All objectives but grpo: train rows (conversations; pairs, either answer; kto's examples, two of a "
        "preference row) longer than "
        "hyperparameters.maxSeqLength, cut at it (the end of their answers, and of their turn, not learned: "
        "raise maxSeqLength if they are many). Absent when none."))
    rows_left_out: int | None = Field(None, description=(
        "Train rows (kto: examples) with no token to learn within maxSeqLength (an answer that starts past it, "
        "or none of weight 1; grpo: a prompt that leaves no room for an answer), not trained on. Absent when none."))
    train_tokens: int = Field(description="Tokens seen in training (non-padding).")
    tokens_per_second: float = Field(description="Training throughput (real tokens, all processes).")
    real_token_share: float = Field(description="Share of the tokens computed on that were not padding (0-1).")
    processes: int = Field(1, description="Training processes (GPUs) that shared the work.")
    peak_gpu_memory_gib: float | None = Field(None, alias="peakGpuMemoryGiB", description="Peak GPU memory PyTorch allocated on rank 0 (GiB).")
    dequantized_once: bool | None = Field(None, description=(
        "qlora: whether the 4-bit weights were dequantized once (spec.qlora.dequantizeOnce) on rank 0."))
    skipped_steps: int | None = Field(None, description=(
        "fp16: optimizer steps skipped because the scaled gradients overflowed (the loss scale was then "
        "halved). A few at the start are normal; many mean the model overflows fp16: use bf16 or fp32."))
    best_step: int | None = Field(None, description=(
        "The step whose weights were saved, with hyperparameters.selectBest or earlyStopping: the "
        "evaluation with the lowest validation loss (evalLoss is that loss)."))
    stopped_early: bool | None = Field(None, description=(
        "True when hyperparameters.earlyStopping ended training before its last step (steps says where)."))
    reward_accuracy: float | None = Field(None, description=(
        "objective dpo: share of validation pairs whose chosen answer the saved model prefers to the "
        "rejected one more than the base model did (implicit reward of chosen > rejected); with a "
        "reference-free dpo.loss (simpo, orpo), whose chosen answer it finds likelier per token. objective "
        "reward: share of validation pairs whose chosen answer the reward model scores above the rejected one. "
        "objective kto: share of validation examples whose implicit reward lies past KTO's reference point on the side "
        "of their label (above it for a desirable answer, below for an undesirable one)."))
    reward_margin: float | None = Field(None, description=(
        "objective dpo: mean over validation pairs of the implicit reward of the chosen answer minus the "
        "rejected one's (beta x change of log-probability from the base model; with simpo and orpo, beta x "
        "the per-token mean log-probability). objective reward: the chosen answers' mean score minus the "
        "rejected ones'. objective kto: the desirable answers' mean implicit reward minus the undesirable ones'."))
    reward: float | None = Field(None, description=(
        "objective grpo: the grader's mean reward (0-1, or on a python grader's own scale) of the saved "
        "model's answers to the validation prompts, decoded greedily."))
    base_reward: float | None = Field(None, description=(
        "objective grpo: the same of the model before training, to compare reward with."))
    grader_usage: dict[str, ApiUsage] | None = Field(None, description=(
        "objective grpo: what all processes asked of grpo.grader's API endpoints (an API judge, a cosine's "
        "embeddings), by endpoint field (judge, embeddings) or, in a sum, by part name (cost: its price); kept "
        "in each checkpoint, so a resumed run counts on from it."))
    resumed_from_step: int | None = Field(None, description="The checkpoint the last attempt resumed from.")
    loss_curve_uri: str = Field(description=(
        "metrics/loss.csv and loss.png: loss and learning rate per step, and the validation loss where evaluated "
        "(objective grpo: also the step's mean reward, and the validation prompts' where evaluated)."))
    estimate: dict[str, float] | None = Field(None, description="The memory/FLOPs estimate for the real model and GPU.")
    wall_seconds: float = Field(description="Training wall time.")


class FineTuneStatus(StatusBase):
    result: FineTuneResult | None = Field(None, description="Set when training succeeded.")
    estimate: str | None = Field(None, description="Estimated GPU memory, FLOPs and time, from the planner.")


KIND = KindInfo(
    kind="FineTune", plural="finetunes", short_names=["ft"], phase="finetune",
    spec=FineTuneSpec, status=FineTuneStatus, headline_column="Loss",
    description="Fine-tunes a model on a dataset (LoRA, QLoRA or full).",
)
