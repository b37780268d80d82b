"""Quantization: a trained model converted to GGUF for llama.cpp, or to compressed-tensors for vLLM,
with the quality loss measured."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from .common import ApiModel, KindInfo, LocalObjectReference, ModelSource, RunOptions, StatusBase

# f32 ... q4_0: written by gguf-py in Python. K-quants: llama.cpp's llama-quantize (in the runtime image).
GgufType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0",
                   "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_m", "q2_k"]
# compressed-tensors checkpoints for vLLM, written by llmcompressor: fp8 = FP8 weights and dynamic
# per-token FP8 activations; gptq / awq = 4-bit integer weights in groups, 16-bit activations (W4A16).
CompressedType = Literal["fp8", "gptq", "awq"]
GGUF_TYPES, COMPRESSED_TYPES = GgufType.__args__, CompressedType.__args__
# Quantizers that learn from calibration data (the FineTune's train split).
CALIBRATED_TYPES = ("gptq", "awq")
QuantType = Literal[GgufType, CompressedType]


class QuantizationInput(ApiModel):
    cel_rules: ClassVar = [
        {"rule": "has(self.fineTuneRef) != has(self.source)", "message": "set exactly one of fineTuneRef or source"},
        {"rule": "!has(self.source) || !has(self.source.ggufFile)", "fieldPath": ".source.ggufFile",
         "message": "the model is already a GGUF file: quantize the safetensors model it came from"},
    ]

    fine_tune_ref: LocalObjectReference | None = Field(None, description="A FineTune's trained model.")
    source: ModelSource | None = Field(None, description="Any transformers Llama-family model by id or URI.")


class Validation(ApiModel):
    split: Literal["test", "validation"] = Field("test", description=(
        "Which held-out split of the FineTune's dataset each type is measured on: validation for a dataset "
        "built without a test split (the FineTune evaluated on it, it did not learn it)."))
    max_perplexity_increase_percent: float | None = Field(
        None, ge=0, description="Fail when a type's perplexity exceeds the unquantized model's by more than this "
                                "(percent). Needs rows in that split.")
    min_top_token_agreement_percent: float | None = Field(
        None, ge=0, le=100, description="Fail when a type's most likely next token matches the unquantized "
                                        "model's at fewer than this share of held-out assistant positions.")
    max_samples: int = Field(32, ge=1, description="Conversations of that split to measure on (its first ones).")


class QuantizationSpec(RunOptions):
    # types unset is ["q8_0"] (the planner's default; a list default is not the CRD's), which
    # format compressed-tensors does not take.
    cel_rules: ClassVar = [
        {"rule": "self.format != 'gguf' || !has(self.types) || self.types.all(t, t in %s)" % list(GGUF_TYPES),
         "message": "format gguf takes GGUF types: " + ", ".join(GGUF_TYPES)},
        {"rule": "self.format != 'compressed-tensors' || (has(self.types) && self.types.all(t, t in %s))"
                 % list(COMPRESSED_TYPES),
         "message": "format compressed-tensors takes types fp8, gptq, awq (types is required with it)"},
    ]

    model: QuantizationInput = Field(description="The model to convert.")
    format: Literal["gguf", "compressed-tensors"] = Field(
        "gguf", description="gguf: files for llama.cpp (CPU or GPU). compressed-tensors: checkpoints for vLLM "
                            "written by llmcompressor, one folder per type (a GPU by default; awq needs one).")
    types: list[QuantType] = Field(
        default_factory=lambda: ["q8_0"], min_length=1, max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="One artifact per type. gguf: f32 ... q2_k; K-quants (q4_k_m, ...) run llama.cpp's "
                    "llama-quantize, which the runtime image carries. compressed-tensors: fp8 (FP8 weights, "
                    "dynamic FP8 activations), gptq and awq (4-bit weights, 16-bit activations; calibrated on "
                    "the FineTune's train split).")
    importance_matrix: bool = Field(
        False, description="For K-quants: compute an importance matrix (llama-imatrix) on the FineTune's "
                           "train split and quantize with it; better quality at the same size.")
    calibration_samples: int = Field(
        256, ge=1, le=100000, description="Train-split conversations the importance matrix, gptq and awq "
                                          "calibrate on (each cut at 2048 tokens).")
    validation: Validation = Field(default_factory=Validation,
                                   description="Perplexity check on a held-out split of the FineTune's dataset.")
    benchmark_ref: LocalObjectReference | None = Field(
        None, description="Convert only once this Benchmark has succeeded, i.e. passed its gates (one whose "
                          "gates fail never succeeds: the Quantization keeps waiting). A gate, not an input: "
                          "setting it does not make a finished Quantization run again.")

    @model_validator(mode="after")
    def _types_of_format(self):
        # The CEL rules above, for manifests that never meet an API server (llmfactory run / plan).
        allowed = GGUF_TYPES if self.format == "gguf" else COMPRESSED_TYPES
        wrong = [t for t in self.types if t not in allowed]
        if wrong:
            raise ValueError(f"types {wrong} are not {self.format} types; format {self.format} takes: "
                             + ", ".join(allowed))
        return self


class QuantizedArtifact(ApiModel):
    type: str = Field(description="GGUF or compressed-tensors type.")
    uri: str = Field(description="The .gguf file, or the compressed-tensors model folder.")
    size_bytes: int = Field(description="File size (the folder's files, for compressed-tensors).")
    sha256: str = Field(description="Digest of the file (of the folder's files, for compressed-tensors).")
    bits_per_weight: float = Field(description="File bits per model parameter.")
    group_size: int | None = Field(None, description="gptq / awq: weights sharing one scale (128 unless a "
                                                     "layer's width needs a smaller power of two).")
    perplexity: float | None = Field(None, description="Perplexity of the artifact loaded back (transformers).")
    perplexity_increase_percent: float | None = Field(None, description="Versus the unquantized model.")
    top_token_agreement_percent: float | None = Field(
        None, description="Share of held-out assistant positions where its top next token is the unquantized "
                          "model's.")
    answer: str | None = Field(None, description="The start of its greedy answer to a held-out chat prompt, "
                                                 "loaded back through transformers.")
    llama_cpp: LlamaCppCheck | None = Field(
        None, description="The file loaded by llama.cpp itself (llama-cpp-python, when the runtime has it).")
    failures: list[str] | None = Field(None, description=(
        "Why it failed validation: each bound it missed, with the value it got, and a llama.cpp tokenizer "
        "that cuts text otherwise than the model's. Absent when it passed; any makes the Quantization Failed "
        "(reason ValidationFailed), its artifacts kept."))


class LlamaCppCheck(ApiModel):
    tokenizer_matches: bool = Field(description="llama.cpp cuts a multilingual sample into the same tokens as "
                                                "the model's own tokenizer (a mismatch fails validation).")
    answer: str = Field(description="The start of llama.cpp's greedy answer to a chat prompt.")
    tokens_per_second: float = Field(description="Its generation speed in the phase's pod.")


class QuantizationResult(ApiModel):
    artifacts: list[QuantizedArtifact] = Field(description="One per requested type.")
    reference_perplexity: float | None = Field(None, description="Perplexity of the unquantized model.")
    measured_rows: int | None = Field(None, description=(
        "Conversations of spec.validation.split each type was measured on. Absent: none was measured (a model "
        "given by URI, a GRPO FineTune's prompts, or a dataset without rows in that split and no bounds set)."))
    passed: bool = Field(description="Every artifact within validation bounds (none has failures).")
    dataset_uri: str | None = Field(None, description="Held-out data of the source model, passed on to a Benchmark.")
    dataset_format: str | None = Field(None, description="Row format of that data.")
    dataset_digest: str | None = Field(None, description="Digest of that data.")
    dataset_reference_fields: list[str] | None = Field(None, description=(
        "Of a GRPO model's prompts: the fields holding a reference answer, passed on to a Benchmark."))


class QuantizationStatus(StatusBase):
    result: QuantizationResult | None = Field(None, description="Set when the conversion finished.")


KIND = KindInfo(
    kind="Quantization", plural="quantizations", short_names=["quant"], phase="quantize",
    spec=QuantizationSpec, status=QuantizationStatus, headline_column="Size",
    description="Converts a model to GGUF or compressed-tensors types and measures their perplexity.",
)
