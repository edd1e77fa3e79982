"""The stage runner (flows/runner.py) on a real MLflow store: what a later run reuses is checked against the hashes
recorded when the stage wrote it."""

from __future__ import annotations

import json
import shutil
import uuid

from rlhf_pipeline.flows.runner import damaged_input, find_reusable, save_result
from rlhf_pipeline.tasks.stage import StageDir, StageResult


def _finished_stage(tmp_path, tiny_model_path, key: str):
    """An SFT stage that finished: its model folder, its result.json and a FINISHED MLflow run carrying its key."""
    from mlflow import MlflowClient

    layout = StageDir(tmp_path / "runs" / "first" / "sft")
    shutil.copytree(tiny_model_path, layout.model)
    save_result(layout, StageResult("sft", paths={"model": str(layout.model)}, metrics={"eval_loss": 1.0}), key)
    client = MlflowClient()
    experiment = client.create_experiment(f"runner-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment, tags={"rlhf.cache_key": key, "rlhf.stage": "sft",
                                              "rlhf.output_dir": str(layout.root)})
    client.set_terminated(run.info.run_id, "FINISHED")
    return experiment, run.info.run_id, layout


def test_a_corrupt_reused_model_is_trained_again(tmp_path, mlflow_uri, tiny_model_path):
    """Issue 11, item 3: a 0-byte model.safetensors in a reusable stage is found before the next stage loads it; the
    stage runs again (a miss), and the message names the file."""
    key = uuid.uuid4().hex[:24]
    experiment, run_id, layout = _finished_stage(tmp_path, tiny_model_path, key)
    recorded = json.loads(layout.result.read_text())["digests"]
    assert str(layout.model / "model.safetensors") in recorded  # hashed when the stage finished

    hit = find_reusable(experiment, "sft", key)
    assert hit is not None and hit.mlflow_run_id == run_id and hit.status == "reused"
    assert damaged_input({"sft_model_path": str(layout.model)}) is None

    (layout.model / "model.safetensors").write_bytes(b"")  # truncated on disk (a full disk, a killed copy...)
    warnings: list[str] = []
    assert find_reusable(experiment, "sft", key, warn=warnings.append) is None
    assert len(warnings) == 1 and str(layout.model / "model.safetensors") in warnings[0]
    assert "0 bytes now" in warnings[0] and "runs again" in warnings[0]
    # a stage that fails on such an input says which file, and that --no-cache re-runs everything
    problem = damaged_input({"sft_model_path": str(layout.model), "prepared_dir": str(tmp_path)})
    assert problem and "model.safetensors differs from what was written" in problem

    (layout.model / "planted.py").write_text("print('hi')")  # a file added after the fact is not what was written
    shutil.copy(tiny_model_path / "model.safetensors", layout.model / "model.safetensors")
    assert "planted.py was added after the stage finished" in damaged_input({"m": str(layout.model)})
