"""The one typed configuration of the pipeline.

``params.yaml`` (DVC's parameter file) holds the defaults; a profile (``smoke``, ``demo``, ``full``) named in its
``profiles`` section is merged over them; CLI overrides (``section.key=value``) come last. Exactly the resolved values are
logged as MLflow params and key the caches (design principle 3).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

PROFILES = ("smoke", "demo", "full")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Section):
    """One input data source.

    ``path`` is a local file (JSON, JSON lines, optionally gzip, Parquet, CSV); ``hf_dataset`` is the public dataset the
    same source resolves to when ``path`` is absent and a hub is reachable. ``format`` is detected from the rows when
    ``auto``.
    """

    name: str
    path: str | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    format: Literal["auto", "hh_rlhf", "prompt_chosen_rejected", "kwise", "messages", "alpaca", "seed_tasks"] = "auto"


class DataConfig(_Section):
    """Ingestion, splitting and validation of the canonical datasets."""

    comparisons: list[SourceConfig]
    demonstrations: list[SourceConfig]
    prepared_dir: str = "data/prepared"
    # Fractions of prompts per split; the split of a row is a hash of its prompt, so a prompt never crosses splits
    # and rows keep their split when new data arrives.
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.7, "validation": 0.1, "test": 0.2})
    split_seed: str = "rlhf-v1"
    invalid_rows: Literal["drop", "fail"] = "drop"
    max_invalid_fraction: float = 0.02
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 512
    min_rows: dict[str, int] = Field(default_factory=lambda: {"demonstrations": 20, "comparisons": 50, "prompts": 20})

    @model_validator(mode="after")
    def _check_splits(self) -> "DataConfig":
        total = sum(self.splits.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"data.splits must sum to 1, got {total}")
        for name in ("train", "test"):
            if name not in self.splits:
                raise ValueError(f"data.splits needs a '{name}' split")
        return self


class ModelConfig(_Section):
    """The base model: ``smollm2-135m-instruct`` (bundled GGUF, converted once), ``tiny-random`` (test model), a local
    folder or a Hugging Face id."""

    base: str = "smollm2-135m-instruct"
    cache_dir: str | None = None  # default ~/.cache/rlhf-pipeline
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 1234


class SFTConfig(_Section):
    """Supervised fine-tuning (InstructGPT App. C.1)."""

    max_examples: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    min_lr_ratio: float = 0.1  # cosine decay to 10% of the peak LR
    max_length: int = 256
    eval_examples: int | None = 16
    logging_steps: int = 1
    # checkpoint selection (App. C.1): by mean RM score on validation prompts when this reward model is available
    # ("champion" = the registry's champion RM, a folder, or null), else by validation loss
    selection_reward_model: str | None = "champion"
    selection_prompts: int = 16
    # optimizer steps between resumable checkpoints in output_dir/sft/trainer/checkpoint-N (0: none); a rerun with the
    # same configuration and output_dir resumes from the newest (model, optimizer, scheduler, RNG, data position and
    # the checkpoint selector's best epoch)
    checkpoint_every: int = Field(0, ge=0)


class RewardConfig(_Section):
    """Reward model training (InstructGPT §3.5, App. C.2)."""

    mode: Literal["head", "top_layers", "full"] = "head"
    top_layers: int = 6
    max_train_pairs: int | None = Field(300, ge=1)
    max_eval_pairs: int | None = Field(300, ge=1)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    # ridge strengths tried by 5-fold cross-validation in the head-only mode (logistic regression on frozen features)
    head_l2_candidates: list[float] = Field(default_factory=lambda: [10.0, 100.0, 1000.0, 10000.0])
    max_length: int = 384
    normalize: bool = True
    # the judge RM: trained like the RM on a split the RM never sees; evaluation's "gold" reward
    judge: bool = True
    judge_split: str = "validation"
    max_judge_pairs: int | None = 300
    # steps between resumable checkpoints of the fine-tuning modes (full, top_layers) in
    # output_dir/reward/checkpoints/{model,judge}/step-N (0: none); a rerun with the same output_dir resumes
    checkpoint_every: int = Field(0, ge=0)


class PPOConfig(_Section):
    """PPO against the reward model with a per-token KL penalty (InstructGPT §3.5, App. C.4)."""

    steps: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)  # episodes per rollout
    mini_batch_size: int = Field(4, ge=1)
    ppo_epochs: int = Field(1, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    value_learning_rate: float = Field(1e-5, gt=0)
    kl_coef: float = Field(0.02, ge=0)  # beta
    # adaptive KL controller (Ziegler et al. 2019 §2.2): beta follows the measured KL towards kl_target
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    max_prompt_tokens: int = Field(128, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None
    max_grad_norm: float = 1.0
    ema_decay: float | None = None  # EMA of the policy's weights (paper: 0.992); the EMA weights are saved
    # PPO-ptx (InstructGPT eq. 2): + ptx_coef * E_pretrain[log pi(x)]; 0 turns it off (paper: 27.8)
    ptx_coef: float = 0.0
    ptx_batch_size: int = 2
    ptx_max_tokens: int = 128
    ptx_source: str = "comparisons"  # chosen dialogues of the train comparisons, or a text/JSONL file path
    checkpoint_every: int = Field(0, ge=0)  # steps between checkpoints in output_dir/ppo/checkpoints (0: none)

    @model_validator(mode="after")
    def _check_minibatches(self) -> "PPOConfig":
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"ppo.mini_batch_size ({self.mini_batch_size}) must divide ppo.batch_size ({self.batch_size})")
        return self


class EvaluateConfig(_Section):
    """Evaluation on held-out prompts."""

    num_prompts: int = Field(32, ge=1)
    max_prompt_tokens: int = Field(128, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(8, ge=1)
    temperature: float = 1.0  # the PPO sampling temperature, so kl_to_sft is the KL the penalty controls
    top_p: float = 1.0
    ppl_texts: int = 32  # held-out pretraining texts (ppo.ptx_source, test split) for the alignment tax
    ppl_max_tokens: int = 128


class RegistryConfig(_Section):
    policy_name: str = "rlhf-policy"
    reward_model_name: str = "rlhf-reward-model"
    experiment: str = "rlhf-pipeline"


class CacheConfig(_Section):
    """Stage caching: a stage whose inputs (data version, its config section, the model section, the upstream stages'
    keys and its code) are unchanged reuses the earlier run's outputs instead of training again."""

    enabled: bool = True


class PromotionConfig(_Section):
    """Gates a challenger must pass before the ``champion`` alias moves to it (all must pass).

    The win rate is the challenger policy's over the champion policy under this run's judge RM on the same held-out
    prompts; there is no win-rate gate while no champion exists (the first run).
    """

    enabled: bool = True
    min_win_rate_vs_champion: float = Field(0.5, ge=0, le=1)
    max_kl_to_sft: float = Field(5.0, ge=0)  # nats per response, the challenger's KL to its own SFT model
    min_reward_accuracy: float = Field(0.55, ge=0, le=1)  # the challenger RM's held-out pairwise accuracy
    require_informative_judge: bool = False  # also require the judge to beat the "shorter reply wins" baseline


class RetrainConfig(_Section):
    """The ``rlhf-retrain`` schedule (the deployment in ``infra/prefect.yaml`` carries the same values)."""

    cron: str = "0 3 * * 1"
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _check_cron(self) -> "RetrainConfig":
        fields = self.cron.split()
        if len(fields) != 5:
            raise ValueError(f"retrain.cron must have 5 fields (minute hour day month weekday), got {self.cron!r}")
        from prefect.client.schemas.schedules import CronSchedule  # Prefect's own check of what it will schedule

        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except ValueError as exc:
            detail = "; ".join(e["msg"] for e in getattr(exc, "errors", lambda: [])()) or str(exc)
            raise ValueError(f"retrain: {detail}") from None
        return self


class Config(_Section):
    """The resolved configuration of one run."""

    profile: Literal["smoke", "demo", "full"] = "demo"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)

    def section_hash(self, section: str) -> str:
        """A short sha256 of one section's resolved values (cache keys, lineage tags)."""
        payload = json.dumps(getattr(self, section).model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def flat_params(self) -> dict[str, str]:
        """The resolved values as ``section.key -> str`` for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)

        walk("", self.model_dump(mode="json"))
        return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    dotted, value = override.split("=", 1)
    node = raw
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    try:
        node[keys[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:  # not YAML (e.g. a cron string "*/15 * * * *"): the text itself
        node[keys[-1]] = value


def load_config(
    path: str | Path = "params.yaml",
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Load ``params.yaml``, merge the profile's section over it and apply ``section.key=value`` overrides.

    Relative data paths are resolved against the folder of ``path``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for an unknown profile, a malformed override or a file that is not YAML.
        pydantic.ValidationError: when a value has the wrong type or an unknown key (the message names the key).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"configuration file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}".replace('"<unicode string>"', str(path))) from None
    profiles = raw.pop("profiles", {}) or {}
    name = profile or raw.get("profile") or "demo"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    merged = _deep_merge(raw, profiles.get(name, {}) or {})
    merged["profile"] = name
    for override in overrides or []:
        _apply_override(merged, override)
    base = path.resolve().parent
    for kind in ("comparisons", "demonstrations"):
        for source in merged.get("data", {}).get(kind, []) or []:
            p = source.get("path")
            if p and not Path(p).is_absolute():
                source["path"] = str((base / p).resolve())
    prepared = merged.get("data", {}).get("prepared_dir")
    if prepared and not Path(prepared).is_absolute():
        merged["data"]["prepared_dir"] = str((base / prepared).resolve())
    return Config.model_validate(merged)
