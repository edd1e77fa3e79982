"""The one declaration of the pipeline's stages: what each reads, what it consumes, where its code is, what it shows.

This table drives the flow's wiring (:mod:`rlhf_pipeline.flows.pipeline` calls each stage's function with exactly the
sections named here, in this order), the cache keys (:mod:`rlhf_pipeline.flows.caching` hashes exactly these sections,
the upstream stages' keys and the code the stage's module imports), ``summary.json``'s stage list, the headline
figures logged on the parent MLflow run and the table ``rlhf run`` prints.

A stage function's leading parameters are its sections (``run_sft(cfg: SFTConfig, model_cfg: ModelConfig, ...)``), so
its signature says what its cache key covers; ``tests/unit/test_stages.py`` checks the table against the signatures.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the stage's name (Prefect task, MLflow run, ``summary.json`` key, output folder).
        sections: the configuration sections its function reads, in the order of its leading parameters.
        upstream: the stages whose outputs it consumes; their cache keys are part of its own.
        entry: ``module:function`` of the plain stage function in ``rlhf_pipeline.tasks``.
        figures: the metrics shown in ``rlhf run``'s table (``<metric>_ci`` beside ``<metric>`` when both are
            named) and, the numeric ones, logged on the parent run as ``<stage>.<metric>``.
        cached: whether a finished run with the same key is reused (the data gate is DVC's to cache).
    """

    name: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    entry: str
    figures: tuple[str, ...]
    cached: bool = True

    @property
    def module(self) -> str:
        """The stage function's module, e.g. ``rlhf_pipeline.tasks.sft``."""
        return self.entry.split(":", 1)[0]

    def function(self) -> Callable:
        """The stage function (imported on first use: ``rlhf --help`` imports no torch)."""
        module, name = self.entry.split(":", 1)
        return getattr(importlib.import_module(module), name)


STAGES: tuple[Stage, ...] = (
    Stage("validate", ("data",), (), "rlhf_pipeline.tasks.validate:run_validate",
          ("rows_demonstrations", "rows_comparisons", "rows_prompts", "dropped_rows"), cached=False),
    Stage("sft", ("sft", "model"), (), "rlhf_pipeline.tasks.sft:run_sft", ("train_loss", "eval_loss")),
    Stage("reward", ("reward", "model"), ("sft",), "rlhf_pipeline.tasks.reward:run_reward",
          ("accuracy", "accuracy_ci", "accuracy_shorter_baseline", "judge_accuracy", "judge_accuracy_ci")),
    Stage("ppo", ("ppo", "model"), ("sft", "reward"), "rlhf_pipeline.tasks.ppo:run_ppo",
          ("mean_reward_first", "mean_reward", "kl")),
    # evaluate reads ppo.ptx_source (the held-out text of the alignment tax)
    Stage("evaluate", ("evaluate", "model", "ppo"), ("sft", "reward", "ppo"), "rlhf_pipeline.tasks.evaluate:run_evaluate",
          ("win_rate_vs_sft", "win_rate_vs_sft_ci", "win_rate_vs_sft_length_controlled",
           "win_rate_vs_sft_length_controlled_ci", "win_rate_vs_sft_judge", "win_rate_vs_sft_judge_ci",
           "mean_reward_policy", "mean_reward_sft", "kl_to_sft", "ended_with_eos_policy", "ppl_sft", "ppl_policy",
           "ppl_sft_heldout", "ppl_policy_heldout", "proxy_judge_correlation")),
)
STAGE: dict[str, Stage] = {stage.name: stage for stage in STAGES}
