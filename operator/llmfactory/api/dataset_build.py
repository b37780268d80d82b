"""DatasetBuild: prompts -> teacher answers -> filtered, split conversations."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .common import ApiModel, KindInfo, ModelSource, RunOptions, StatusBase, URI_PATTERN

LANGUAGE_PATTERN = r"^[a-z]{2,3}$"


class InlinePrompt(ApiModel):
    text: str = Field(min_length=1, description="The user prompt.")
    language: str | None = Field(None, pattern=LANGUAGE_PATTERN,
                                 description="ISO 639 code of the prompt's language, e.g. en, ru, zh.")


class Source(ApiModel):
    """One place prompts come from."""

    cel_rules: ClassVar = [
        {"rule": "has(self.inline) != has(self.uri)", "message": "set exactly one of inline or uri"},
    ]

    inline: list[InlinePrompt] | None = Field(None, min_length=1, description="Prompts written in the manifest.")
    uri: str | None = Field(None, pattern=URI_PATTERN,
                            description="A JSONL file (s3:// or file://), one object per line.")
    prompt_field: str = Field("prompt", description="JSONL field holding the prompt text.")
    language_field: str = Field("language", description="JSONL field holding the prompt's language code.")
    language: str | None = Field(None, pattern=LANGUAGE_PATTERN,
                                 description="Language of every prompt of this source that does not name its own.")


class Teacher(ApiModel):
    """The model that answers the prompts."""

    model: ModelSource = Field(description="A local transformers model run inside the phase's pod.")
    system_prompt: str | None = Field(None, description="System message sent before every prompt.")
    temperature: float = Field(0.0, ge=0, le=2, description="0 decodes greedily (reproducible).")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Longest answer, in tokens.")
    batch_size: int = Field(8, ge=1, le=512, description="Prompts answered together.")
    seed: int = Field(0, description="Sampling seed when temperature > 0.")


class Filters(ApiModel):
    refusals: bool = Field(True, description="Drop answers that refuse (English, Russian, Chinese patterns).")
    refusal_patterns: list[str] = Field(default_factory=list,
                                        description="Extra case-insensitive regular expressions marking a refusal.")
    drop_truncated: bool = Field(True, description="Drop answers cut off at maxNewTokens.")
    min_answer_chars: int = Field(1, ge=0, description="Drop answers shorter than this.")
    max_answer_chars: int | None = Field(None, ge=1, description="Drop answers longer than this.")


class Split(ApiModel):
    cel_rules: ClassVar = [
        {"rule": "self.validation + self.test < 1.0", "message": "validation + test must leave rows for train"},
    ]

    validation: float = Field(0.1, ge=0, lt=1, description="Share of rows for validation.")
    test: float = Field(0.1, ge=0, lt=1, description="Share of rows for test.")
    seed: int = Field(42, description="Seed of the shuffle; the same seed gives the same split.")


class DatasetBuildSpec(RunOptions):
    sources: list[Source] = Field(min_length=1, description="Where the prompts come from.")
    samples_per_language: dict[str, int] | None = Field(
        None, description="Keep at most this many prompts per language code (sampled with split.seed); "
                          "languages not listed are dropped. Unset keeps every prompt.")
    teacher: Teacher = Field(description="The model that writes the answers.")
    filters: Filters = Field(default_factory=Filters, description="Which answers to drop.")
    format: Literal["chatml", "sharegpt"] = Field(
        "chatml", description="chatml: {messages: [{role, content}]}; sharegpt: {conversations: [{from, value}]}.")
    split: Split = Field(default_factory=Split, description="Train/validation/test split.")


class DatasetBuildResult(ApiModel):
    uri: str = Field(description="Prefix holding train.jsonl, validation.jsonl, test.jsonl and README.md.")
    format: str = Field(description="Row format of the files.")
    digest: str = Field(description="sha256 over the split files.")
    rows: dict[str, int] = Field(description="Rows per split.")
    rows_per_language: dict[str, int] = Field(description="Rows kept per language.")
    dropped: dict[str, int] = Field(description="Rows dropped, per reason.")
    teacher_tokens: int = Field(description="Tokens the teacher generated.")


class DatasetBuildStatus(StatusBase):
    result: DatasetBuildResult | None = Field(None, description="Set when the build succeeded.")


KIND = KindInfo(
    kind="DatasetBuild", plural="datasetbuilds", short_names=["dsb"], phase="dataset",
    spec=DatasetBuildSpec, status=DatasetBuildStatus, headline_column="Rows",
    description="Builds a chat dataset: prompts answered by a teacher model, filtered and split.",
)
