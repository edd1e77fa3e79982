"""The MLflow model registry: the policy and the reward model logged as MLflow models, registered as ``challenger``,
and the ``champion`` alias moved by a promotion decision, by hand, or back by a rollback.

Each model is logged as an MLflow ``pyfunc`` model whose artifact ``model/`` is the transformers folder
(safetensors + tokenizer), so it loads both ways: ``mlflow.pyfunc.load_model("models:/rlhf-policy@champion")`` and
``AutoModelForCausalLM.from_pretrained(<downloaded artifact>/artifacts/model)``. Registry stages are deprecated in
MLflow 3: versions carry the aliases ``challenger`` (every new version) and ``champion`` (moved only when the gates of
:func:`rlhf_pipeline.tasks.promotion.check_gates` pass, by ``rlhf promote --version``, or back by ``--rollback``).

The decision and its figures are written as tags on the challenger's model versions (``rlhf.promotion.*``); a promoted
version also records the version it replaced (``rlhf.promotion.previous_champion``), which is what :func:`rollback`
returns to. Policy and reward model move together: the policy version carries the number of the reward model version
of the same run (``rlhf.reward_model_version``), both aliases move in one journaled step (:func:`move_champions`) that
:func:`repair_champions` completes if a process dies half-way, and rollback walks the policy's chain for both.
A version is reused for a later run only when its weights are the same (:data:`WEIGHTS_TAG`, a content hash).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_pipeline.tasks.promotion import Decision
from rlhf_pipeline.tasks.stage import numeric_metrics

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG = "rlhf.promotion."


@dataclass
class RegisteredModel:
    """A registered model version: ``name``, ``version``, its ``aliases``; ``reused`` when an earlier run registered
    it (this run registered nothing new)."""

    name: str
    version: int
    aliases: list[str] = field(default_factory=list)
    reused: bool = False


def log_and_register(
    model_dir: str | Path,
    kind: str,
    registered_name: str,
    tags: dict[str, str],
) -> RegisteredModel:
    """Log ``model_dir`` as a pyfunc model in the active MLflow run and register a new version of ``registered_name``
    with the alias ``challenger``.

    The ``champion`` alias is not touched here: :func:`apply_decision` moves it after the gates. ``tags`` are set on
    the version (lineage: data version, git commit, params hash, code version, parent run, Prefect flow run...).

    Args:
        model_dir: transformers folder (safetensors) written by a stage.
        kind: ``policy`` or ``reward_model``.

    Returns:
        the new version (alias ``challenger``).

    Raises:
        FileNotFoundError: when ``model_dir`` holds no safetensors weights (nothing is logged or registered).
    """
    import mlflow
    from mlflow import MlflowClient

    from rlhf_pipeline.flows.pyfunc_models import PIP_REQUIREMENTS, PolicyModel, RewardModelPyfunc

    model_dir = Path(model_dir)
    if not list(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"no safetensors weights in {model_dir}; refusing to register {registered_name}")
    wrapper = PolicyModel() if kind == "policy" else RewardModelPyfunc()
    info = mlflow.pyfunc.log_model(
        name=kind,
        python_model=wrapper,
        artifacts={"model": str(model_dir)},
        pip_requirements=PIP_REQUIREMENTS,
        tags=tags,
    )
    version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
    MlflowClient().set_registered_model_alias(registered_name, CHALLENGER, version.version)
    return RegisteredModel(registered_name, int(version.version), [CHALLENGER])


#: model-version tag: sha256 over the files of the registered model folder (weights, config, tokenizer)
WEIGHTS_TAG = "rlhf.weights_sha256"


def weights_digest(model_dir: str | Path) -> str:
    """The content hash of a model folder (every file: weights, config, tokenizer), independent of where it lies."""
    from rlhf_pipeline.flows.caching import outputs_digest

    return outputs_digest([model_dir])


def find_registered(registered_name: str, tag: str, value: str) -> RegisteredModel | None:
    """The newest version of ``registered_name`` whose tag ``tag`` equals ``value``; ``None`` when there is none."""
    from mlflow import MlflowClient

    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{registered_name}' and tags.`{tag}` = '{value}'")
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    full = client.get_model_version(registered_name, newest.version)
    return RegisteredModel(registered_name, int(full.version), sorted(full.aliases))


def find_same_weights(policy_name: str, reward_model_name: str, policy_digest: str,
                      reward_model_digest: str) -> list[RegisteredModel] | None:
    """``[reward model, policy]`` versions registered earlier with exactly these weights (the policy's
    :data:`WEIGHTS_TAG` equals ``policy_digest`` and its run's reward model version's equals ``reward_model_digest``);
    ``None`` when there are none. A version is never credited to a run on a cache key alone: a re-run whose training
    gave other weights (even by 1e-4) registers its own."""
    from mlflow import MlflowClient

    client = MlflowClient()
    candidates = client.search_model_versions(f"name = '{policy_name}' and tags.`{WEIGHTS_TAG}` = '{policy_digest}'")
    for version in sorted(candidates, key=lambda v: -int(v.version)):
        full = client.get_model_version(policy_name, version.version)
        rm_version = full.tags.get("rlhf.reward_model_version")
        if not rm_version:
            continue
        rm = client.get_model_version(reward_model_name, rm_version)
        if rm.tags.get(WEIGHTS_TAG) == reward_model_digest:
            return [RegisteredModel(reward_model_name, int(rm.version), sorted(rm.aliases)),
                    RegisteredModel(policy_name, int(full.version), sorted(full.aliases))]
    return None


def download_model_dir(
    registered_name: str, ref: str, dst: str | Path, required_tags: dict[str, str] | None = None
) -> Path | None:
    """The transformers folder of ``registered_name@ref`` (an alias such as ``champion``, or a version number)
    downloaded into ``dst``; ``None`` when the registered model, alias or version does not exist (a first run has no
    champion), or when the version lacks one of ``required_tags`` (e.g. a reward model built on another base model)."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if str(ref).isdigit():
            version = client.get_model_version(registered_name, str(ref))
        else:
            version = client.get_model_version_by_alias(registered_name, ref)
    except MlflowException:
        return None
    if any(version.tags.get(k) != v for k, v in (required_tags or {}).items()):
        return None
    local = Path(download_artifacts(artifact_uri=f"models:/{registered_name}/{version.version}", dst_path=str(dst)))
    folder = local / "artifacts" / "model"
    return folder if folder.exists() else None


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``name@alias``, ``name/3`` or ``models:/name@alias`` → ``(name, alias_or_version)``.

    Raises:
        ValueError: for a reference with neither an alias nor a version.
    """
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, alias
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        if version.isdigit():
            return name, version
    raise ValueError(f"{ref!r} is not a model reference: use NAME@ALIAS (rlhf-policy@champion) or NAME/VERSION")


def champion_version(name: str) -> int | None:
    """The version number ``name@champion`` points at, or ``None`` (no such model or alias)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return int(MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def _tag(name: str, version: int, tags: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value)[:5000])


def apply_decision(decision: Decision, policy_name: str, reward_model_name: str, reward_model_version: int) -> None:
    """Write the decision on the challenger's versions (policy and reward model) and, if promoted, move ``champion``
    to both (the previous champion is recorded for :func:`rollback`)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tags = {TAG + "decision": "promoted" if decision.promoted else "rejected", TAG + "time": stamp,
            TAG + "reasons": "; ".join(decision.reasons), TAG + "rolled_back_at": ""}
    tags.update({TAG + key: f"{value:.6g}" for key, value in numeric_metrics(decision.figures).items()})
    tags.update({TAG + key: "[" + ", ".join(f"{v:.6g}" for v in value) + "]"
                 for key, value in decision.figures.items() if isinstance(value, list)})
    if decision.promoted:
        tags[TAG + "previous_champion"] = "" if decision.previous_champion is None else str(decision.previous_champion)
        previous_rm = champion_version(reward_model_name)
        _tag(reward_model_name, reward_model_version,
             {**tags, TAG + "previous_champion": "" if previous_rm is None else str(previous_rm)})
        _tag(policy_name, decision.challenger_version, tags)
        move_champions(policy_name, reward_model_name, decision.challenger_version, reward_model_version)
    else:
        _tag(policy_name, decision.challenger_version, tags)
        _tag(reward_model_name, reward_model_version, tags)


#: registered-model tag on the policy: a champion pair move in progress (JSON), the journal of :func:`move_champions`
MOVE_TAG = "rlhf.champion_move"


def move_champions(policy_name: str, reward_model_name: str, policy_version: int, reward_model_version: int) -> None:
    """Move ``champion`` of the policy and of its reward model as one: the pair is first written as a journal (the
    registered-model tag :data:`MOVE_TAG` of the policy), then both aliases move, then the journal is cleared. MLflow
    has no transaction over two registered models; a process killed between the two moves leaves the journal behind,
    and :func:`repair_champions` (run before every promotion, rollback and pipeline run) completes the move."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_registered_model_tag(policy_name, MOVE_TAG, json.dumps(
        {"policy": int(policy_version), "reward_model": int(reward_model_version),
         "reward_model_name": reward_model_name}))
    client.set_registered_model_alias(reward_model_name, CHAMPION, str(reward_model_version))
    client.set_registered_model_alias(policy_name, CHAMPION, str(policy_version))
    client.delete_registered_model_tag(policy_name, MOVE_TAG)


def champions_need_repair(policy_name: str, reward_model_name: str) -> bool:
    """Whether :func:`repair_champions` has work to do (a journal left behind, or two champions that are not a pair);
    read-only, so a run checks without taking the promotion lock."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if client.get_registered_model(policy_name).tags.get(MOVE_TAG):
            return True
    except MlflowException:
        return False
    policy = champion_version(policy_name)
    if policy is None:
        return False
    paired = client.get_model_version(policy_name, str(policy)).tags.get("rlhf.reward_model_version")
    return bool(paired) and champion_version(reward_model_name) != int(paired)


def repair_champions(policy_name: str, reward_model_name: str) -> str | None:
    """Make the two champions a pair again: complete a move that a killed process left half done (its journal), or,
    without a journal, point the reward model's ``champion`` at the reward model of the policy champion's run (tag
    ``rlhf.reward_model_version``; e.g. after an alias was moved by hand in the MLflow UI).

    Returns:
        what was repaired, or ``None`` when the champions were already a pair (or there are none).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        pending = client.get_registered_model(policy_name).tags.get(MOVE_TAG)
    except MlflowException:
        return None  # no such registered model yet
    if pending:
        move = json.loads(pending)
        move_champions(policy_name, move.get("reward_model_name", reward_model_name), move["policy"],
                       move["reward_model"])
        return (f"completed an interrupted champion move: {policy_name} version {move['policy']} with "
                f"{move.get('reward_model_name', reward_model_name)} version {move['reward_model']}")
    policy = champion_version(policy_name)
    if policy is None:
        return None
    paired = client.get_model_version(policy_name, str(policy)).tags.get("rlhf.reward_model_version")
    current = champion_version(reward_model_name)
    if not paired or current == int(paired):
        return None
    client.set_registered_model_alias(reward_model_name, CHAMPION, paired)
    return (f"{reward_model_name}@champion was version {current}, not the reward model of {policy_name}@champion "
            f"(version {policy}); moved it to version {paired}")


def rollback(policy_name: str, reward_model_name: str) -> dict:
    """Move ``champion`` of the policy back to the version it replaced, and the reward model's to that version's
    reward model, as one move (:func:`move_champions`): both walk the policy's chain.

    Returns:
        ``{"policy": (from, to), "reward_model": (from, to)}`` version numbers.

    Raises:
        LookupError: when the policy has no champion, or its champion records no previous champion.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    current = champion_version(policy_name)
    if current is None:
        raise LookupError(f"{policy_name} has no champion to roll back")
    previous = client.get_model_version(policy_name, str(current)).tags.get(TAG + "previous_champion", "")
    if not previous:
        raise LookupError(f"{policy_name}@champion (version {current}) replaced no earlier champion; "
                          "nothing to roll back to")
    current_rm = champion_version(reward_model_name)
    previous_rm = client.get_model_version(policy_name, previous).tags.get("rlhf.reward_model_version")
    if not previous_rm and current_rm is not None:  # a policy registered without its RM: the RM's own chain
        previous_rm = client.get_model_version(reward_model_name, str(current_rm)).tags.get(
            TAG + "previous_champion", "") or None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rolled = {TAG + "decision": "rolled_back", TAG + "rolled_back_at": stamp}
    _tag(policy_name, current, rolled)
    moves = {"policy": (current, int(previous))}
    if previous_rm:
        if current_rm is not None:
            _tag(reward_model_name, current_rm, rolled)
        move_champions(policy_name, reward_model_name, int(previous), int(previous_rm))
        moves["reward_model"] = (current_rm, int(previous_rm))
    else:
        client.set_registered_model_alias(policy_name, CHAMPION, previous)
    return moves


def promote_version(policy_name: str, reward_model_name: str, version: int) -> dict:
    """Make policy ``version`` (and the reward model version of its run) the champion by hand, recording the previous
    champion so :func:`rollback` can undo it.

    Raises:
        LookupError: when the version does not exist.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        policy = client.get_model_version(policy_name, str(version))
    except MlflowException as exc:
        raise LookupError(f"{policy_name} has no version {version}") from exc
    rm_version = policy.tags.get("rlhf.reward_model_version")
    decision = Decision(True, [f"pass: promoted by hand ({time.strftime('%Y-%m-%d %H:%M:%S')})"],
                        challenger_version=int(version), champion_version=int(version),
                        previous_champion=champion_version(policy_name))
    if decision.previous_champion == int(version):
        return {"unchanged": True}
    moves = {"policy": (decision.previous_champion, int(version))}
    if rm_version:
        moves["reward_model"] = (champion_version(reward_model_name), int(rm_version))
        apply_decision(decision, policy_name, reward_model_name, int(rm_version))
    else:  # a version registered without its reward model: move the policy alone
        _tag(policy_name, int(version), {TAG + "decision": "promoted",
                                         TAG + "previous_champion": decision.previous_champion or ""})
        client.set_registered_model_alias(policy_name, CHAMPION, str(version))
    return moves
