"""The one typed configuration of the pipeline.

``params.yaml`` (DVC's parameter file) holds the defaults; a profile (``smoke``, ``demo``, ``full``) named in its
``profiles`` section is merged over them; CLI overrides (``section.key=value``) come last. Exactly the resolved values are
logged as MLflow params and key the caches.

The section a stage reads is declared beside the stage (``DataConfig`` in :mod:`rlhf_pipeline.tasks.validate`,
``SFTConfig`` in :mod:`rlhf_pipeline.tasks.sft`, ...); this module composes them and adds the sections only the
orchestration reads (registry, cache, retrain); ``collect`` (the human-feedback loop) is declared beside its task in
:mod:`rlhf_pipeline.tasks.collect`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from rlhf_pipeline.flows.workers import DistributedConfig
from rlhf_pipeline.tasks.collect import CollectConfig
from rlhf_pipeline.tasks.evaluate import EvaluateConfig
from rlhf_pipeline.tasks.ppo import PPOConfig
from rlhf_pipeline.tasks.promotion import PromotionConfig
from rlhf_pipeline.tasks.reward import RewardConfig
from rlhf_pipeline.tasks.sft import SFTConfig
from rlhf_pipeline.tasks.stage import ModelConfig, Section, section_hash
from rlhf_pipeline.tasks.validate import NAME_PATTERN, DataConfig

PROFILES = ("smoke", "demo", "full")


class RegistryConfig(Section):
    """Names in the MLflow registry and tracking store (letters, digits, '.', '_', '-': a name with '/', '@' or a
    space would not survive a ``models:/NAME@ALIAS`` reference)."""

    policy_name: str = Field("rlhf-policy", pattern=NAME_PATTERN)
    reward_model_name: str = Field("rlhf-reward-model", pattern=NAME_PATTERN)
    experiment: str = Field("rlhf-pipeline", pattern=NAME_PATTERN)

    @model_validator(mode="after")
    def _distinct(self) -> "RegistryConfig":
        if self.policy_name == self.reward_model_name:
            raise ValueError("registry.policy_name and registry.reward_model_name must differ")
        return self


class CacheConfig(Section):
    """Stage caching: a stage whose inputs (data version, its config section, the model section, the upstream stages'
    keys and its code) are unchanged reuses the earlier run's outputs instead of training again."""

    enabled: bool = True


class RetrainConfig(Section):
    """The ``rlhf-retrain`` schedule (the deployment in ``infra/prefect.yaml`` carries the same values)."""

    cron: str = Field("0 3 * * 1", min_length=1)
    timezone: str = Field("UTC", min_length=1)

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


class Config(Section):
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
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    collect: CollectConfig = Field(default_factory=CollectConfig)

    @model_validator(mode="after")
    def _across_sections(self) -> "Config":
        if self.reward.judge and self.reward.judge_split not in self.data.splits:
            raise ValueError(f"reward.judge_split {self.reward.judge_split!r} is not one of data.splits "
                             f"({', '.join(self.data.splits)})")
        workers = self.distributed.workers
        if workers > 1:  # PPO splits its global batches into equal shares (SFT, RM and evaluation take uneven ones)
            sizes = {"ppo.batch_size": self.ppo.batch_size, "ppo.mini_batch_size": self.ppo.mini_batch_size}
            if self.ppo.ptx_coef > 0:
                sizes["ppo.ptx_batch_size"] = self.ppo.ptx_batch_size
            uneven = [f"{key} ({value})" for key, value in sizes.items() if value % workers]
            if uneven:
                raise ValueError(f"{', '.join(uneven)} must be a multiple of distributed.workers ({workers}): each "
                                 "worker takes an equal share of PPO's global batches")
        return self

    def section_hash(self, section: str) -> str:
        """A short sha256 of one section's resolved values."""
        return section_hash(getattr(self, section))

    def params_hash(self) -> str:
        """A short sha256 of all resolved values (the lineage tag ``rlhf.params_hash``)."""
        return hashlib.sha256(json.dumps(self.flat_params(), sort_keys=True).encode()).hexdigest()[:16]

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
