"""The policy and the reward model as MLflow ``pyfunc`` models: what ``mlflow.pyfunc.load_model("models:/...")``
serves. Each wraps the transformers folder logged as the artifact ``model`` (safetensors + tokenizer)."""

from __future__ import annotations

import mlflow.pyfunc

PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "safetensors", "pandas"]


class PolicyModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a policy: ``predict(DataFrame[prompt]) -> list[str]`` (greedy, 64 new tokens)."""

    def load_context(self, context):
        from rlhf_pipeline.models.loading import load_causal_lm, load_tokenizer, resolve_device

        path = context.artifacts["model"]
        self.tokenizer = load_tokenizer(path)
        self.model = load_causal_lm(path, resolve_device("auto")).eval()

    def predict(self, context, model_input, params=None):
        from rlhf_pipeline.models.policy import sample_responses
        from rlhf_pipeline.models.tokens import chat_prompt_ids

        prompts = list(model_input["prompt"])
        queries = [chat_prompt_ids(self.tokenizer, [{"role": "user", "content": p}], 512) for p in prompts]
        max_new = int((params or {}).get("max_new_tokens", 64))
        rollout = sample_responses(self.model, self.tokenizer, queries, max_new, do_sample=False)
        return self.tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)


class RewardModelPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of the reward model: ``predict(DataFrame[prompt, response]) -> list[float]`` (normalised scores)."""

    def load_context(self, context):
        from rlhf_pipeline.models.loading import load_tokenizer, resolve_device
        from rlhf_pipeline.models.reward_model import ScalarHeadModel

        path = context.artifacts["model"]
        self.tokenizer = load_tokenizer(path)
        self.model = ScalarHeadModel.from_pretrained(path, resolve_device("auto")).eval()

    def predict(self, context, model_input, params=None):
        from rlhf_pipeline.models.reward_model import score_texts

        prompts = [[{"role": "user", "content": p}] for p in model_input["prompt"]]
        return score_texts(self.model, self.tokenizer, prompts, list(model_input["response"]), 1024).tolist()
