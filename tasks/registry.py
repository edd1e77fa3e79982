"""MLflow model logging and registry calls: the policy and the reward model as MLflow models, registered with aliases.

Each model is logged as an MLflow ``pyfunc`` model whose artifact ``model/`` is the transformers folder
(safetensors + tokenizer), so it loads both ways: ``mlflow.pyfunc.load_model("models:/rlhf-policy@champion")`` and
``AutoModelForCausalLM.from_pretrained(<downloaded artifact>/artifacts/model)``. Registry stages are deprecated in
MLflow 3: versions carry the aliases ``challenger`` (every new version) and ``champion`` (moved only by
:mod:`tasks.promotion` when the gates pass).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc

CHAMPION = "champion"
CHALLENGER = "challenger"
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "safetensors", "pandas"]


class PolicyModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a policy: ``predict(DataFrame[prompt]) -> list[str]`` (greedy, 64 new tokens)."""

    def load_context(self, context):
        from models.loading import load_causal_lm, load_tokenizer, resolve_device

        path = context.artifacts["model"]
        self.tokenizer = load_tokenizer(path)
        self.model = load_causal_lm(path, resolve_device("auto")).eval()

    def predict(self, context, model_input, params=None):
        from models.policy import sample_responses
        from models.reward_model import chat_prompt_ids

        prompts = list(model_input["prompt"])
        queries = [chat_prompt_ids(self.tokenizer, [{"role": "user", "content": p}], 512) for p in prompts]
        max_new = int((params or {}).get("max_new_tokens", 64))
        rollout = sample_responses(self.model, self.tokenizer, queries, max_new, do_sample=False)
        return self.tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)


class RewardModelPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of the reward model: ``predict(DataFrame[prompt, response]) -> list[float]`` (normalised scores)."""

    def load_context(self, context):
        from models.loading import load_tokenizer, resolve_device
        from models.reward_model import ScalarHeadModel

        path = context.artifacts["model"]
        self.tokenizer = load_tokenizer(path)
        self.model = ScalarHeadModel.from_pretrained(path, resolve_device("auto")).eval()

    def predict(self, context, model_input, params=None):
        from models.reward_model import score_texts

        prompts = [[{"role": "user", "content": p}] for p in model_input["prompt"]]
        return score_texts(self.model, self.tokenizer, prompts, list(model_input["response"]), 1024).tolist()


def log_and_register(
    model_dir: str | Path,
    kind: str,
    registered_name: str,
    tags: dict[str, str],
) -> dict:
    """Log ``model_dir`` as a pyfunc model in the active MLflow run and register a new version of ``registered_name``
    with the alias ``challenger``.

    The ``champion`` alias is not touched here: :mod:`tasks.promotion` moves it after the gates. ``tags`` are set on
    the version (lineage: data version, git commit, params hash, code version, parent run, Prefect flow run...).

    Args:
        model_dir: transformers folder (safetensors) written by a stage.
        kind: ``policy`` or ``reward_model``.

    Returns:
        ``{"name", "version", "aliases", "model_uri"}``.

    Raises:
        FileNotFoundError: when ``model_dir`` holds no safetensors weights (nothing is logged or registered).
    """
    from mlflow import MlflowClient

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
    return {"name": registered_name, "version": int(version.version), "aliases": [CHALLENGER],
            "model_uri": info.model_uri}


def find_registered(registered_name: str, tag: str, value: str) -> dict | None:
    """The newest version of ``registered_name`` whose tag ``tag`` equals ``value`` (e.g. the version registered from
    a PPO run that a cached run reuses), as ``{"name", "version", "aliases"}``; ``None`` when there is none."""
    from mlflow import MlflowClient

    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{registered_name}' and tags.`{tag}` = '{value}'")
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    full = client.get_model_version(registered_name, newest.version)
    return {"name": registered_name, "version": int(full.version), "aliases": sorted(full.aliases)}


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
