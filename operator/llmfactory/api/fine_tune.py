"""FineTune: a base model trained on a dataset with LoRA or full fine-tuning."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from .common import ApiModel, KindInfo, LocalObjectReference, ModelSource, Resources, RunOptions, StatusBase, URI_PATTERN


class DatasetInput(ApiModel):
    cel_rules: ClassVar = [
        {"rule": "has(self.datasetBuildRef) != has(self.uri)", "message": "set exactly one of datasetBuildRef or uri"},
    ]

    dataset_build_ref: LocalObjectReference | None = Field(None, description="A DatasetBuild in this namespace.")
    uri: str | None = Field(None, pattern=URI_PATTERN,
                            description="Prefix holding train.jsonl and validation.jsonl (chatml rows).")


class Lora(ApiModel):
    r: int = Field(16, ge=1, le=1024, description="Rank of the adapter matrices.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="Module names to adapt, or ['all-linear'].")


class Hyperparameters(ApiModel):
    epochs: int = Field(1, ge=1, le=1000, description="Passes over the train split.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (AdamW).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps with linear warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(4, ge=1, le=4096, description="Conversations per micro-batch per process.")
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_seq_length: int = Field(1024, ge=16, le=1048576, description="Tokens per conversation; longer ones are cut.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for initialisation and shuffling.")


class FineTuneSpec(RunOptions):
    cel_rules: ClassVar = [
        {"rule": "self.method != 'full' || !has(self.lora)", "message": "lora settings apply only to method lora"},
    ]

    base_model: ModelSource = Field(description="The model to fine-tune.")
    dataset: DatasetInput = Field(description="The conversations to train on.")
    method: Literal["lora", "full"] = Field("lora", description="lora trains an adapter; full trains every weight.")
    lora: Lora | None = Field(None, description="Adapter settings (method lora); defaults apply when unset.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Training settings.")
    resources: Resources = Field(default_factory=Resources, description="Compute for the training Job.")

    @model_validator(mode="after")
    def _lora_defaults(self):
        # Spelled out in the task, so the digest changes if a default ever does.
        if self.method == "lora" and self.lora is None:
            self.lora = Lora()
        return self


class FineTuneResult(ApiModel):
    model_uri: str = Field(description="Whole model (adapter merged into the base, or fully trained): safetensors, tokenizer, chat template.")
    adapter_uri: str | None = Field(None, description="LoRA adapter (method lora).")
    base_model: ModelSource = Field(description="The model that was fine-tuned.")
    dataset_uri: str = Field(description="Dataset the model was trained on.")
    dataset_format: str = Field(description="Row format of the dataset.")
    dataset_digest: str = Field(description="Digest of the dataset.")
    digest: str = Field(description="sha256 over the saved model weights.")
    first_loss: float = Field(description="Mean train loss of the first (up to ten) steps.")
    final_loss: float = Field(description="Mean train loss of the last (up to ten) steps.")
    eval_loss: float | None = Field(None, description="Loss on the validation split after training.")
    steps: int = Field(description="Optimizer steps.")
    train_tokens: int = Field(description="Tokens seen in training (non-padding).")
    tokens_per_second: float = Field(description="Training throughput.")
    wall_seconds: float = Field(description="Training wall time.")


class FineTuneStatus(StatusBase):
    result: FineTuneResult | None = Field(None, description="Set when training succeeded.")


KIND = KindInfo(
    kind="FineTune", plural="finetunes", short_names=["ft"], phase="finetune",
    spec=FineTuneSpec, status=FineTuneStatus, headline_column="Loss",
    description="Fine-tunes a model on a dataset (LoRA or full).",
)
