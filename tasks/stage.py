"""What every stage shares: the ``model`` section it reads, the metric callback it reports through, its result type,
seeding, and the file layout of its output folder.

A stage is a plain function ``run_<stage>(<its config sections>, <typed inputs>, output_dir, log) -> StageResult``;
orchestration (Prefect tasks, MLflow runs, caching, distribution) lives in ``rlhf_pipeline.flows`` and hands each stage
a :class:`MetricLogger`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every configuration section: unknown keys are errors (a typo never passes silently)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN / inf are never a setting


def section_hash(section: BaseModel) -> str:
    """A short sha256 (16 hex digits) of a section's resolved values: what a resumable checkpoint was written under."""
    payload = json.dumps(section.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ModelConfig(Section):
    """The ``model`` section, read by every training and evaluation stage: the base model (``smollm2-135m-instruct``,
    the bundled GGUF converted once; ``tiny-random``, the test model; a local folder or a Hugging Face id), the model
    cache, the device, the numerical precision and the seed.

    ``precision``: weights and optimizer states are always fp32; ``bf16`` computes in bfloat16 (autocast in one
    process, FSDP2's mixed-precision policy across workers), ``fp32`` in float32, ``auto`` picks bf16 on CUDA and fp32
    on CPU (:mod:`rlhf_pipeline.models.precision`).
    """

    base: str = Field("smollm2-135m-instruct", min_length=1)
    cache_dir: str | None = Field(None, min_length=1)  # default ~/.cache/rlhf-pipeline
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = Field(1234, ge=0, le=2**32 - 1)  # numpy's range


class LoraConfig(Section):
    """LoRA adapters for a trained model (Hu et al. 2022): rank ``r`` (0: off, the whole model trains), scale
    ``alpha / r``, dropout on the adapter input, and the linear layers that get adapters. What a stage saves is the
    merged full model (:func:`rlhf_pipeline.models.lora.merged`)."""

    r: int = Field(0, ge=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1)


class MetricLogger(Protocol):
    """``log(metrics, step)``: called by training loops with grouped metric names (``ppo/kl``, ``sft/loss``...)."""

    def __call__(self, metrics: dict[str, float], step: int) -> None: ...


def no_log(metrics: dict[str, float], step: int) -> None:
    """A :class:`MetricLogger` that drops everything (stages called from tests)."""


@dataclass
class StageResult:
    """What a stage returns: paths of what it wrote and its summary metrics (plain floats, ``[low, high]`` lists and
    short strings).

    Results are small and picklable: Prefect tasks pass them on, never models or tensors.
    """

    stage: str
    paths: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float | list | str] = field(default_factory=dict)


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict as floats (booleans, lists and strings left out): what MLflow takes."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU runs with the same seed give the same metrics)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class StageDir:
    """The file layout of a stage's output folder, named in one place (stages write it, the flows read it)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def model(self) -> Path:
        """The trained model (transformers folder, safetensors + tokenizer)."""
        return self.root / "model"

    @property
    def judge(self) -> Path:
        """The judge reward model of the reward stage."""
        return self.root / "judge"

    @property
    def checkpoints(self) -> Path:
        """Resumable step checkpoints (``step-NNNNNN`` folders)."""
        return self.root / "checkpoints"

    @property
    def history(self) -> Path:
        """Per-step figures as a JSON list (PPO's curves)."""
        return self.root / "history.json"

    @property
    def samples(self) -> Path:
        """The evaluation's samples (JSON lines)."""
        return self.root / "samples.jsonl"

    @property
    def ppo_curves(self) -> Path:
        """The PNG of PPO's curves (the evaluation draws it from PPO's history)."""
        return self.root / "ppo_curves.png"

    @property
    def report(self) -> Path:
        """The evaluation's HTML report."""
        return self.root / "report.html"

    @property
    def result(self) -> Path:
        """``result.json``: the stage's paths, metrics and cache key (written by the flow's stage runner)."""
        return self.root / "result.json"
