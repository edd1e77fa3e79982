"""The registry (flows/registry.py) on a real MLflow store (SQLite): model references, versions reused only for the
same weights, and the champion pair that moves as one even when the process is killed half-way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from rlhf_pipeline.flows import registry
from rlhf_pipeline.flows.registry import parse_model_ref


def test_model_references():
    assert parse_model_ref("rlhf-policy@champion") == ("rlhf-policy", "champion")
    assert parse_model_ref("models:/rlhf-policy/3") == ("rlhf-policy", "3")
    with pytest.raises(ValueError, match="NAME@ALIAS"):
        parse_model_ref("rlhf-policy")


def test_a_version_is_reused_only_for_the_same_weights(tmp_path, mlflow_uri, tiny_model_path):
    """Issue 11, item 2: a re-run whose weights differ (here by 1e-4 in one tensor, as when the champion RM picked
    another SFT epoch) is never credited to an earlier version registered under the same cache keys."""
    import mlflow
    from safetensors.torch import load_file, save_file

    policy, rm = tmp_path / "policy", tmp_path / "rm"
    shutil.copytree(tiny_model_path, policy)
    shutil.copytree(tiny_model_path, rm)
    names = (f"rm-{uuid.uuid4().hex[:6]}", f"policy-{uuid.uuid4().hex[:6]}")
    digests = {"policy": registry.weights_digest(policy), "rm": registry.weights_digest(rm)}
    assert registry.weights_digest(shutil.copytree(policy, tmp_path / "copy")) == digests["policy"]  # place-free
    with mlflow.start_run():
        first_rm = registry.log_and_register(rm, "reward_model", names[0], {registry.WEIGHTS_TAG: digests["rm"]})
        first = registry.log_and_register(policy, "policy", names[1],
                                          {registry.WEIGHTS_TAG: digests["policy"], "rlhf.ppo_cache_key": "k1",
                                           "rlhf.reward_model_version": str(first_rm.version)})
    found = registry.find_same_weights(names[1], names[0], digests["policy"], digests["rm"])
    assert [(e.name, e.version) for e in found] == [(names[0], first_rm.version), (names[1], first.version)]

    weights = next(policy.glob("*.safetensors"))
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1e-4
    save_file(tensors, weights, metadata={"format": "pt"})
    retrained = registry.weights_digest(policy)
    assert retrained != digests["policy"]
    assert registry.find_same_weights(names[1], names[0], retrained, digests["rm"]) is None  # the same cache key "k1"
    assert registry.find_same_weights(names[1], names[0], digests["policy"], "0" * 64) is None  # another RM


def _versions(client, name: str, count: int) -> None:
    client.create_registered_model(name)
    for _ in range(count):
        client.create_model_version(name, source="file:///nonexistent/model", run_id=None)


KILL_BETWEEN_THE_MOVES = """
import os, signal, sys
import mlflow
from mlflow import MlflowClient
from rlhf_pipeline.flows import registry
mlflow.set_tracking_uri(sys.argv[1])
real = MlflowClient.set_registered_model_alias
def move_then_die(self, name, alias, version):
    real(self, name, alias, version)
    if alias == "champion":
        os.kill(os.getpid(), signal.SIGKILL)  # killed right after the first of the two champion moves
MlflowClient.set_registered_model_alias = move_then_die
registry.move_champions(sys.argv[2], sys.argv[3], 2, 2)
"""


def test_champion_pair_moves_as_one_even_when_killed_between_the_moves(mlflow_uri):
    """Issue 11, item 5: a process SIGKILLed between the reward model's and the policy's champion move leaves a
    journal; the next promotion, rollback or run completes the move, so both champions are from the same run (and a
    rollback walks one chain)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    policy, rm = f"policy-{uuid.uuid4().hex[:6]}", f"rm-{uuid.uuid4().hex[:6]}"
    _versions(client, rm, 2)
    _versions(client, policy, 2)
    for version in (1, 2):
        client.set_model_version_tag(policy, str(version), "rlhf.reward_model_version", str(version))
    registry.move_champions(policy, rm, 1, 1)
    client.set_model_version_tag(policy, "2", "rlhf.promotion.previous_champion", "1")

    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN_THE_MOVES, mlflow_uri, policy, rm],
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert registry.champion_version(rm) == 2 and registry.champion_version(policy) == 1  # the half-done move
    assert json.loads(client.get_registered_model(policy).tags[registry.MOVE_TAG])["policy"] == 2

    assert registry.champions_need_repair(policy, rm)
    repaired = registry.repair_champions(policy, rm)  # what the next run, promotion or rollback does first
    assert repaired and "completed an interrupted champion move" in repaired
    assert (registry.champion_version(policy), registry.champion_version(rm)) == (2, 2)
    assert registry.MOVE_TAG not in client.get_registered_model(policy).tags
    assert registry.repair_champions(policy, rm) is None and not registry.champions_need_repair(policy, rm)

    # rollback moves both back along the policy's chain, as one move
    assert registry.rollback(policy, rm) == {"policy": (2, 1), "reward_model": (2, 1)}
    assert (registry.champion_version(policy), registry.champion_version(rm)) == (1, 1)

    # an alias moved by hand (no journal) is re-paired to the policy champion's reward model
    client.set_registered_model_alias(rm, "champion", "2")
    assert "moved it to version 1" in registry.repair_champions(policy, rm)
    assert registry.champion_version(rm) == 1
