"""Quantization: a trained model converted to GGUF for llama.cpp, with the quality loss measured."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .common import ApiModel, KindInfo, LocalObjectReference, ModelSource, RunOptions, StatusBase

# f32 ... q4_0: written by gguf-py in Python. K-quants: llama.cpp's llama-quantize (in the runtime image).
GgufType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0",
                   "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_m", "q2_k"]


class QuantizationInput(ApiModel):
    cel_rules: ClassVar = [
        {"rule": "has(self.fineTuneRef) != has(self.source)", "message": "set exactly one of fineTuneRef or source"},
    ]

    fine_tune_ref: LocalObjectReference | None = Field(None, description="A FineTune's trained model.")
    source: ModelSource | None = Field(None, description="Any transformers Llama-family model by id or URI.")


class Validation(ApiModel):
    max_perplexity_increase_percent: float | None = Field(
        None, ge=0, description="Fail when a type's perplexity exceeds the unquantized model's by more than this.")
    min_top_token_agreement_percent: float | None = Field(
        None, ge=0, le=100, description="Fail when a type's most likely next token matches the unquantized "
                                        "model's at fewer than this share of held-out assistant positions.")
    max_samples: int = Field(32, ge=1, description="Held-out conversations to measure perplexity on.")


class QuantizationSpec(RunOptions):
    model: QuantizationInput = Field(description="The model to convert.")
    format: Literal["gguf"] = Field("gguf", description="Output format.")
    types: list[GgufType] = Field(default_factory=lambda: ["q8_0"], min_length=1,
                                  description="One artifact per type. K-quants (q4_k_m, ...) run llama.cpp's "
                                              "llama-quantize, which the runtime image carries.")
    importance_matrix: bool = Field(
        False, description="For K-quants: compute an importance matrix (llama-imatrix) on the FineTune's "
                           "train split and quantize with it; better quality at the same size.")
    validation: Validation = Field(default_factory=Validation,
                                   description="Perplexity check on the FineTune's test split.")
    benchmark_ref: LocalObjectReference | None = Field(
        None, description="Convert only once this Benchmark has succeeded, i.e. passed its gates (one whose "
                          "gates fail never succeeds: the Quantization keeps waiting).")


class QuantizedArtifact(ApiModel):
    type: str = Field(description="GGUF type.")
    uri: str = Field(description="The .gguf file.")
    size_bytes: int = Field(description="File size.")
    sha256: str = Field(description="File digest.")
    bits_per_weight: float = Field(description="File bits per model parameter.")
    perplexity: float | None = Field(None, description="Perplexity of the GGUF loaded back.")
    perplexity_increase_percent: float | None = Field(None, description="Versus the unquantized model.")
    top_token_agreement_percent: float | None = Field(
        None, description="Share of held-out assistant positions where its top next token is the unquantized "
                          "model's.")
    llama_cpp: LlamaCppCheck | None = Field(
        None, description="The file loaded by llama.cpp itself (llama-cpp-python, when the runtime has it).")


class LlamaCppCheck(ApiModel):
    tokenizer_matches: bool = Field(description="llama.cpp cuts a multilingual sample into the same tokens as "
                                                "the model's own tokenizer (a mismatch fails validation).")
    answer: str = Field(description="The start of llama.cpp's greedy answer to a chat prompt.")
    tokens_per_second: float = Field(description="Its generation speed in the phase's pod.")


class QuantizationResult(ApiModel):
    artifacts: list[QuantizedArtifact] = Field(description="One per requested type.")
    reference_perplexity: float | None = Field(None, description="Perplexity of the unquantized model.")
    passed: bool = Field(description="Every artifact within validation bounds.")
    dataset_uri: str | None = Field(None, description="Held-out data of the source model, passed on to a Benchmark.")
    dataset_format: str | None = Field(None, description="Row format of that data.")
    dataset_digest: str | None = Field(None, description="Digest of that data.")


class QuantizationStatus(StatusBase):
    result: QuantizationResult | None = Field(None, description="Set when the conversion finished.")


KIND = KindInfo(
    kind="Quantization", plural="quantizations", short_names=["quant"], phase="quantize",
    spec=QuantizationSpec, status=QuantizationStatus, headline_column="Size",
    description="Converts a model to GGUF types and measures their perplexity.",
)
