"""``summary.json``: what a pipeline run did, rewritten after every step so a failed run still says how far it got."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rlhf_pipeline.flows.stages import STAGES


class Summary:
    """``DIR/summary.json``: the run's data version, run ids, per-stage status/metrics, registered models and the
    promotion decision.

    Keys: ``data`` (version and row counts), ``mlflow_parent_run_id``, ``prefect_flow_run_id``, ``output_dir``,
    ``tracking_uri``, ``profile``, ``stages`` (one entry per stage of :data:`~rlhf_pipeline.flows.stages.STAGES`:
    ``status`` pending/running/completed/reused/failed, ``mlflow_run_id``, ``metrics``, ``cache_key``, ``paths``,
    ``reused_from``), ``registered_models``, ``promotion``, and on failure ``failed_stage`` and ``error``.
    """

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {
            "data": {},
            "mlflow_parent_run_id": None,
            "prefect_flow_run_id": None,
            "stages": {s.name: {"status": "pending", "mlflow_run_id": None, "metrics": {}} for s in STAGES},
            "registered_models": [],
        }

    def stage(self, name: str, status: str, run_id: str | None = None, metrics: dict | None = None) -> None:
        """Set a stage's status (and run id, metrics) and write the file."""
        entry = self.data["stages"].setdefault(name, {"status": "pending", "mlflow_run_id": None, "metrics": {}})
        entry["status"] = status
        if run_id:
            entry["mlflow_run_id"] = run_id
        if metrics is not None:
            entry["metrics"] = metrics
        self.write()

    def record(self, outcome) -> None:
        """Record a finished stage (a :class:`~rlhf_pipeline.flows.runner.StageOutcome`) and write the file."""
        self.data["stages"][outcome.stage] = outcome.to_summary()
        self.write()

    def update(self, **values) -> None:
        """Set top-level keys (dataclasses are stored as dicts) and write the file; ``tracking_uri`` and ``error`` are
        stored with the credentials of any URI in them redacted."""
        from rlhf_pipeline.flows.tracking import redact_text

        for key, value in values.items():
            if key in ("tracking_uri", "error", "hint") and isinstance(value, str):
                value = redact_text(value)
            if isinstance(value, list):
                value = [asdict(v) if hasattr(v, "__dataclass_fields__") else v for v in value]
            elif hasattr(value, "__dataclass_fields__"):
                value = asdict(value)
            self.data[key] = value
        self.write()

    def write(self) -> None:
        """Write atomically (a temporary file renamed over the old one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)
