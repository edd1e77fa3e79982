"""Stage 1: supervised fine-tuning on human demonstrations (InstructGPT §3.5 "Supervised fine-tuning", App. C.1).

The method, as the paper gives it and in the order the loop runs it:

- **Data**: each demonstration is the chat prompt with the generation prompt (``<|im_start|>assistant\\n``) followed by
  the response closed with the tokenizer's EOS (``<|im_end|>`` for SmolLM2), so the model learns to stop
  (:func:`encode_demonstration`). When the two exceed ``sft.max_length`` the *prompt* loses its oldest tokens; a
  response longer than the budget keeps its start and still ends with EOS (an over-long demonstration cut at the end
  would teach the model never to stop); such rows are counted (``truncated_responses``).
- **Loss**: next-token negative log-likelihood on the response tokens only, the prompt masked
  (:func:`rlhf_pipeline.models.losses.sft_loss`), averaged over the tokens of the whole optimizer step
  (``sft.batch_size`` × ``sft.grad_accum`` demonstrations).
- **Optimisation**: AdamW (β 0.9/0.999, ε 1e-8, no weight decay: transformers' Trainer defaults, which the TRL version
  used), gradients clipped to norm 1.0, the learning rate decayed on a cosine from its peak to ``sft.min_lr_ratio`` of
  it over the run, no warmup; ``sft.epochs`` may be fractional (the last epoch is cut short).
- **Checkpoint selection** (App. C.1): after every epoch the validation loss is computed; when a reward model is given
  (in a retrain, the registry's ``champion`` RM) the epoch whose greedy responses to validation prompts get the highest
  mean RM score is kept, else the epoch with the lowest validation loss (:class:`CheckpointSelector`).

Distribution (:mod:`rlhf_pipeline.models.distributed`): the same loop runs in one process or on N workers with the
model sharded by FSDP2 (fp32 master weights, bf16 compute with fp32 gradient reduction when ``model.precision`` asks
for bf16). ``sft.batch_size`` is the global micro-batch: its demonstrations are dealt out over the workers (one left
without any runs a stand-in with weight 0), and each worker's loss is the sum over its tokens divided by the step's
global token count, times N (FSDP averages gradients), so N workers take the step one process takes. Validation loss
and RM scores are computed on each worker's share and reduced. LoRA (``sft.lora.r > 0``) trains adapters only; the
saved model has them merged. Activation checkpointing is ``sft.activation_checkpointing``.

Checkpoints (``sft.checkpoint_every`` > 0): every that many optimizer steps and after the last, a
:mod:`rlhf_pipeline.tasks.checkpoints` folder ``output_dir/checkpoints/step-NNNNNN`` holds the trainable weights, the
AdamW state and the selector's best weights (sharded, no pickle) and a ``state.json`` with the step, the per-step
history and the selector's history. The data order and the random streams follow from the step
(:func:`rlhf_pipeline.tasks.checkpoints.step_seed`) and the learning rate from the step count, so nothing else is saved.
A rerun with the same configuration, inputs and ``output_dir`` resumes from the newest, on any number of workers, and
with the same number of workers ends with the same model and metrics as an uninterrupted run on CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from rlhf_pipeline.models import distributed
from rlhf_pipeline.models.distributed import Engine
from rlhf_pipeline.models.loading import assert_same_tokenizer, load_causal_lm, load_tokenizer, resolve_device
from rlhf_pipeline.models.lora import add_lora, merged
from rlhf_pipeline.models.losses import IGNORE_INDEX, sft_loss
from rlhf_pipeline.models.policy import sample_responses
from rlhf_pipeline.models.reward_model import ScalarHeadModel
from rlhf_pipeline.models.tokens import chat_prompt_ids, pad_sequences, response_ids
from rlhf_pipeline.tasks.checkpoints import latest_step, load_step, save_step, step_seed
from rlhf_pipeline.tasks.datasets import load_prepared
from rlhf_pipeline.tasks.progress import progress
from rlhf_pipeline.tasks.stage import (
    LoraConfig,
    MetricLogger,
    ModelConfig,
    Section,
    StageDir,
    StageResult,
    no_log,
    section_hash,
    seed_everything,
)


class SFTConfig(Section):
    """Supervised fine-tuning (InstructGPT App. C.1). Batch sizes are global (over all workers)."""

    max_examples: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)  # demonstrations per micro-batch, over all workers
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    learning_rate: float = Field(2e-5, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decay to 10% of the peak LR
    max_length: int = Field(256, ge=8)  # prompt + response tokens; the prompt is cut from the left first
    eval_examples: int | None = Field(16, ge=1)
    logging_steps: int = Field(1, ge=1)
    # checkpoint selection (App. C.1): by mean RM score on validation prompts when this reward model is available
    # ("champion" = the registry's champion RM, a folder, or null), else by validation loss
    selection_reward_model: str | None = Field("champion", min_length=1)
    selection_prompts: int = Field(16, ge=1)
    # the greedy responses scored for the selection: prompt tokens kept (from the left) and new tokens generated
    selection_max_prompt_tokens: int = Field(128, ge=1)
    selection_max_new_tokens: int = Field(32, ge=1)
    # optimizer steps between resumable checkpoints in output_dir/sft/checkpoints/step-N (0: none); a rerun with the
    # same configuration and output_dir resumes from the newest, on any number of workers
    checkpoint_every: int = Field(0, ge=0)
    lora: LoraConfig = Field(default_factory=LoraConfig)  # LoRA adapters (r = 0: train the whole model)
    activation_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30% slower)


# --- data -------------------------------------------------------------------------------------------------------------

#: an over-long demonstration keeps at least this share of ``max_length`` for the end of its prompt (the latest turn
#: and the generation prompt), so a very long response is cut rather than shown without the question it answers
MIN_PROMPT_SHARE = 0.25


@dataclass(frozen=True)
class Demonstration:
    """One encoded demonstration: ``ids`` = prompt ids then response ids (EOS last), the first ``prompt_length`` of
    them masked from the loss."""

    ids: list[int]
    prompt_length: int
    prompt_truncated: bool = False
    response_truncated: bool = False

    @property
    def label_tokens(self) -> int:
        """Tokens that carry loss: the response tokens predicted from a previous position (all of them unless the
        prompt is empty)."""
        return len(self.ids) - max(self.prompt_length, 1)


def encode_demonstration(tokenizer, messages: list[dict], response: str, max_length: int) -> Demonstration:
    """Encode one demonstration within ``max_length`` tokens for SFT.

    The prompt is the chat template with the generation prompt (:func:`rlhf_pipeline.models.tokens.chat_prompt_ids`),
    the response its text closed with EOS (:func:`rlhf_pipeline.models.tokens.response_ids`). When they do not fit,
    the prompt loses its oldest tokens; the response is cut only when it alone exceeds ``max_length`` minus the
    prompt's reserve (``MIN_PROMPT_SHARE`` of ``max_length``, or the whole prompt when shorter), and then keeps its
    start and its EOS.

    Raises:
        ValueError: when ``max_length`` < 2 (no room for a prompt token and the EOS).
    """
    if max_length < 2:
        raise ValueError(f"sft.max_length must be at least 2, got {max_length}")
    prompt = chat_prompt_ids(tokenizer, messages)
    reserve = min(len(prompt), max(1, int(max_length * MIN_PROMPT_SHARE)))
    response = response_ids(tokenizer, response)
    response_truncated = len(response) > max_length - reserve
    if response_truncated:
        response = response[: max_length - reserve - 1] + [tokenizer.eos_token_id]
    keep = max_length - len(response)
    prompt_truncated = len(prompt) > keep
    if prompt_truncated:
        prompt = prompt[len(prompt) - keep :]
    return Demonstration(prompt + response, len(prompt), prompt_truncated, response_truncated)


def collate(rows: list[Demonstration], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``, each ``[B, T]``; ``labels`` are the ids on response
    tokens and :data:`~rlhf_pipeline.models.losses.IGNORE_INDEX` on prompt and padding tokens."""
    ids, mask = pad_sequences([r.ids for r in rows], pad_id, side="right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    for i, row in enumerate(rows):
        labels[i, : row.prompt_length] = IGNORE_INDEX
    return ids, mask, labels


@dataclass(frozen=True)
class Schedule:
    """How ``n`` demonstrations become optimizer steps: ``micro_batches`` of ``batch_size`` per epoch (the last may
    be short), ``grad_accum`` of them per step, ``steps_per_epoch`` steps an epoch and ``total`` steps in all
    (``ceil(epochs × steps_per_epoch)``, as transformers' Trainer counts them)."""

    n: int
    batch_size: int
    grad_accum: int
    epochs: float

    @property
    def micro_batches(self) -> int:
        return math.ceil(self.n / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches / self.grad_accum)

    @property
    def total(self) -> int:
        return max(1, math.ceil(self.epochs * self.steps_per_epoch - 1e-9))

    def epoch_of(self, step: int) -> int:
        """The 1-based epoch that optimizer step ``step`` (1-based) belongs to."""
        return (step - 1) // self.steps_per_epoch + 1

    def ends_epoch(self, step: int) -> bool:
        """Whether step ``step`` (1-based) is the last of an epoch, or of the run."""
        return step % self.steps_per_epoch == 0 or step == self.total

    def step_rows(self, step: int, seed: int) -> list[list[int]]:
        """The micro-batches (row indices) of optimizer step ``step`` (0-based): consecutive slices of the epoch's
        seeded permutation, so the order needs no state across a resume."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, "sft"))).tolist()
        first = position * self.grad_accum
        return [order[m * self.batch_size : (m + 1) * self.batch_size]
                for m in range(first, min(first + self.grad_accum, self.micro_batches))]


def lr_factor(step: int, total: int, min_ratio: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total`` as a fraction of the peak: a cosine from 1
    down to ``min_ratio`` (reached when the run ends), no warmup (InstructGPT App. C.1)."""
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * step / total))


# --- evaluation and selection ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluation_loss(model, rows: list[Demonstration], batch_size: int, pad_id: int, engine: Engine) -> float:
    """Mean NLL per response token (nats) of ``model`` on ``rows``, token-weighted over all rows.

    Batches of ``batch_size / N`` rows (a training micro-batch's share) are dealt out over the N workers (a worker left
    without a batch runs a stand-in whose result is dropped) and the sums reduced, so every worker gets the value one
    process computes, up to float rounding (right padding leaves the real tokens' logits unchanged). ``nan`` without
    rows."""
    if not rows:
        return float("nan")
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64)
    tokens = 0
    # each worker takes batches of its share of the global batch size (the memory of a training micro-batch)
    for positions in distributed.batches(len(rows), max(1, batch_size // engine.world.size), engine.world):
        ids, mask, labels = collate([rows[i] for i in positions or [0]], pad_id)
        with engine.autocast():
            logits = model(input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device),
                           use_cache=False).logits
        if positions:
            nll += sft_loss(logits, labels.to(engine.device), num_tokens=1).double().cpu()
            tokens += sum(rows[i].label_tokens for i in positions)
    model.train(was_training)
    total = distributed.all_reduce(torch.stack([nll, torch.tensor(float(tokens), dtype=torch.float64)]))
    return float(total[0] / total[1].clamp(min=1.0))


@torch.no_grad()
def mean_reward_of_greedy_responses(model, tokenizer, reward_model, prompts: list[list[dict]], max_prompt_tokens: int,
                                    max_new_tokens: int, batch_size: int = 8, engine: Engine | None = None) -> float:
    """Mean RM score of the model's greedy responses to ``prompts`` (the SFT selection criterion of App. C.1).

    Batches of ``batch_size`` prompts are dealt out over the workers; the policy is unsharded once for all its
    generation (:func:`rlhf_pipeline.models.distributed.gathered`) and the scores are summed over the workers, so the
    batches, and so the responses, are those of one process.
    """
    engine = engine or Engine(distributed.World(), torch.float32)
    was_training = model.training
    model.eval()
    queries = [chat_prompt_ids(tokenizer, p, max_prompt_tokens) for p in prompts]
    total = torch.zeros((), dtype=torch.float64)
    with distributed.gathered(model):
        for positions in distributed.batches(len(queries), batch_size, engine.world):
            with engine.autocast():
                rollout = sample_responses(model, tokenizer, [queries[i] for i in positions or [0]], max_new_tokens,
                                           do_sample=False)
                scores = reward_model.score(rollout.input_ids, rollout.attention_mask,
                                            rollout.sequence_response_mask)  # collective when sharded
            if positions:
                total += scores.double().sum().cpu()
    model.train(was_training)
    return float(distributed.all_reduce(total)) / len(queries)


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This worker's part of a (possibly sharded) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class CheckpointSelector:
    """Keeps the best epoch's trainable weights: highest mean RM score when ``reward_model`` is given, else lowest
    validation loss (InstructGPT App. C.1). ``consider(model, eval_loss, epoch)`` after each epoch; ``restore(model)``
    at the end.

    The copy is this worker's part of each trainable tensor (its shard under FSDP2), on the CPU. :meth:`state` and
    :meth:`load_state` carry the rest across a resume as JSON; :meth:`tensors`, :meth:`template` and
    :meth:`load_tensors` the weights as a checkpoint's (resharded) tensors.
    """

    def __init__(self, reward_model=None, score_fn=None):
        self.reward_model = reward_model
        self.score_fn = score_fn
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []

    @property
    def criterion(self) -> str:
        return "mean_rm_score" if self.reward_model is not None else "eval_loss"

    def consider(self, model, eval_loss: float, epoch: int, step: int | None = None) -> float:
        """Record one epoch's evaluation (``step``: the optimizer step it followed) and keep a CPU copy of the
        trainable weights when it is the best so far. Returns the criterion value (mean RM score, or
        ``-eval_loss``)."""
        value = self.score_fn(model) if self.reward_model is not None else -eval_loss
        entry = {"epoch": float(epoch), "eval_loss": eval_loss, "criterion": value}
        if step is not None:
            entry["step"] = float(step)
        self.history.append(entry)
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, epoch
            names = _trainable_names(model)
            self.best_state = {k: _local(v).detach().to("cpu", copy=True)
                               for k, v in model.state_dict().items() if k in names}
        return value

    def restore(self, model) -> None:
        """Copy the best weights back into ``model`` (in place; every worker its own part)."""
        if self.best_state is None:
            return
        with torch.no_grad():
            for name, tensor in model.state_dict().items():  # these alias the (sharded) parameters
                if name in self.best_state:
                    _local(tensor).copy_(self.best_state[name])

    def state(self) -> dict:
        """The JSON part: criterion, best value and epoch, history, and whether there are weights."""
        return {"criterion": self.criterion, "best": self.best, "best_epoch": self.best_epoch,
                "history": self.history, "has_weights": self.best_state is not None}

    def load_state(self, payload: dict) -> None:
        """Take back :meth:`state` (the weights come with :meth:`load_tensors`).

        Raises:
            ValueError: when it was written under the other criterion.
        """
        if payload["criterion"] != self.criterion:
            raise ValueError(f"the checkpoint was selected by {payload['criterion']}, this run selects by "
                             f"{self.criterion}")
        self.history, self.best, self.best_epoch = payload["history"], payload["best"], payload["best_epoch"]

    def tensors(self, model) -> dict[str, torch.Tensor]:
        """The best weights shaped like ``model``'s (DTensors under FSDP2, so a checkpoint reshards); ``{}``
        without any."""
        if self.best_state is None:
            return {}
        return {k: _like(v, self.best_state[k]) for k, v in model.state_dict().items() if k in self.best_state}

    def template(self, model) -> dict[str, torch.Tensor]:
        """Tensors laid out like ``model``'s trainable ones, for a checkpoint to load the best weights into."""
        names = _trainable_names(model)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}

    def load_tensors(self, loaded: dict[str, torch.Tensor]) -> None:
        """Take the best weights from a filled :meth:`template` (this worker's part, onto the CPU)."""
        self.best_state = {k: _local(v).to("cpu", copy=True) for k, v in loaded.items()}


def _like(reference: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (this worker's part) as a tensor laid out like ``reference`` (a DTensor's shard, or a whole tensor)."""
    if not hasattr(reference, "to_local"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.to(reference.device), reference.device_mesh, reference.placements,
                              run_check=False, shape=reference.shape, stride=reference.stride())


# --- training -------------------------------------------------------------------------------------------------------

def build_sft_model(path: str | Path, cfg: SFTConfig, device: torch.device, seed: int):
    """The model before training: ``path`` in fp32 (the master weights), with LoRA adapters when ``sft.lora.r > 0``
    (initialised from ``seed``, the same on every worker)."""
    model = load_causal_lm(path, device, torch.float32)
    if cfg.lora.r:
        torch.manual_seed(step_seed(seed, 0, "lora"))
        model = add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    return model


def _adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW with transformers' Trainer defaults (β 0.9/0.999, ε 1e-8, no weight decay), fused where the parameters
    are plain tensors (one process), the per-tensor loop on sharded DTensors: the same update rule."""
    fused = all(p.device.type in ("cpu", "cuda") and type(p) is torch.nn.Parameter for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused or None)


def _checkpoint_tensors(model, optimizer, selector: CheckpointSelector) -> dict:
    """What an SFT checkpoint holds as tensors: the trainable weights and the AdamW state (sharded when the model is;
    frozen LoRA base weights left out) and the selector's best weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    tensors = {"model": msd, "optim": osd}
    best = selector.tensors(model)
    if best:
        tensors["best"] = best
    return tensors


def _restore(folder: Path, state: dict, model, optimizer, selector: CheckpointSelector) -> None:
    """Load checkpoint ``folder`` (written by any number of workers) into the model, the optimizer and the
    selector."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    tensors = _checkpoint_tensors(model, optimizer, CheckpointSelector())
    selector.load_state(state["selector"])
    if state["selector"]["has_weights"]:
        tensors["best"] = selector.template(model)
    load_step(folder, tensors)
    set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if "best" in tensors:
        selector.load_tensors(tensors["best"])


def _correct_tokens(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many labelled tokens are the argmax of the logits that predict them (``logits [B, T, V]``, ``labels
    [B, T]``)."""
    target = labels[:, 1:]
    return ((logits[:, :-1].argmax(-1) == target) & (target != IGNORE_INDEX)).sum()


def _logged_figures(history: list[dict[str, float]], step: int, every: int, total: int) -> dict[str, float] | None:
    """The ``sft/*`` figures logged at optimizer step ``step`` (1-based): every ``every`` steps and at the last, the
    loss, token accuracy and grad norm averaged over the steps since the previous log and the step's learning rate;
    ``None`` between logs. Derived from the per-step history alone, so a resumed run replays the curves exactly."""
    if step % every and step != total:
        return None
    window = history[(step - 1) // every * every : step]
    figures = {name: sum(h[name] for h in window) / len(window)
               for name in ("sft/loss", "sft/token_accuracy", "sft/grad_norm")}
    figures["sft/learning_rate"] = history[step - 1]["sft/learning_rate"]
    return figures


def _epoch_figures(entry: dict[str, float], by_rm: bool) -> dict[str, float]:
    figures = {"sft/epoch_eval_loss": entry["eval_loss"]}
    if by_rm:
        figures["sft/selection_rm_score"] = entry["criterion"]
    return figures


def _norm(value) -> float:
    """A gradient norm as a float (FSDP returns a DTensor)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def _save_sft_model(model, engine: Engine, path: str | Path, cfg: SFTConfig, seed: int, folder: Path,
                    tokenizer) -> None:
    """Write the model as a plain transformers folder (LoRA merged, fp32) with the tokenizer (left padding, for
    generation) on worker 0; under FSDP2 the full weights are gathered into a fresh unsharded model built the same
    way."""
    if not distributed.is_wrapped(model):
        if engine.world.is_main:
            merged(model).to(torch.float32).save_pretrained(folder, safe_serialization=True)
    else:
        state = distributed.full_state_dict(model)
        if engine.world.is_main:
            plain = build_sft_model(path, cfg, torch.device("cpu"), seed)
            plain.load_state_dict(state)
            merged(plain).save_pretrained(folder, safe_serialization=True)
    if engine.world.is_main:
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(folder)
    distributed.barrier()


def run_sft(
    cfg: SFTConfig,
    model_cfg: ModelConfig,
    prepared_dir: str | Path,
    base_model_path: str | Path,
    output_dir: str | Path,
    log: MetricLogger = no_log,
    selection_reward_model: str | Path | None = None,
) -> StageResult:
    """Fine-tune the base model on the train demonstrations; save it (safetensors + tokenizer) to ``output_dir/model``.

    Args:
        cfg: the ``sft`` section.
        model_cfg: the ``model`` section (seed, device, precision).
        prepared_dir: folder of the canonical datasets (``demonstrations.parquet``, and ``prompts.parquet`` for the
            selection by RM score).
        base_model_path: transformers folder or id of the base model.
        output_dir: where the stage writes (``model/``, ``checkpoints/``).
        log: receives ``sft/loss`` (nats per response token), ``sft/token_accuracy`` (share of response tokens that
            are the model's argmax), ``sft/learning_rate``, ``sft/grad_norm`` per optimizer step (every
            ``sft.logging_steps``), ``sft/epoch_eval_loss`` (and ``sft/selection_rm_score``) per epoch,
            and ``sft/train_loss`` at the end.
        selection_reward_model: a reward-model folder; when given, the epoch is chosen by mean RM score of greedy
            responses to validation prompts, else by validation loss.

    Returns:
        StageResult with ``paths.model`` and metrics ``train_loss`` (mean per-step loss over the whole run, nats per
        token), ``eval_loss`` (of the kept epoch), ``eval_perplexity``, ``selected_epoch``, ``selection`` (criterion
        name), ``selection_rm_score`` (when selecting by RM), ``train_examples``, ``truncated_responses`` (train
        demonstrations whose response was cut to ``sft.max_length``), ``steps`` (optimizer steps),
        ``resumed_from_step`` (0 for a fresh run), ``workers``, ``wall_s``.

    Checkpoints (``sft.checkpoint_every`` > 0) go to ``output_dir/checkpoints``; a later call with the same
    configuration, inputs and ``output_dir`` resumes from the newest complete one, on any number of workers, and ends
    with the same model and metrics as an uninterrupted run on CPU with as many workers. A checkpoint taken after the
    last step trains nothing more but still restores the selected epoch, writes the model and reports the same
    metrics.

    Raises:
        FileNotFoundError: when the prepared data is missing.
        ValueError: when there are no train demonstrations, or the selection reward model has another tokenizer.
    """
    start = time.time()
    output_dir = Path(output_dir)
    seed = model_cfg.seed
    seed_everything(seed)
    engine = Engine.create(resolve_device(model_cfg.device), model_cfg.precision)
    here, device = engine.world, engine.device

    train = load_prepared(prepared_dir, "demonstrations", split="train")
    if cfg.max_examples is not None:
        train = train.sample(n=min(cfg.max_examples, len(train)), random_state=seed)
    if len(train) == 0:
        raise ValueError(f"no train demonstrations in {prepared_dir}")
    evaluation = load_prepared(prepared_dir, "demonstrations", split="validation")
    if len(evaluation) == 0:
        evaluation = load_prepared(prepared_dir, "demonstrations", split="test")
    if cfg.eval_examples is not None:
        evaluation = evaluation.head(cfg.eval_examples)

    tokenizer = load_tokenizer(base_model_path)
    pad_id = tokenizer.pad_token_id
    rows = [encode_demonstration(tokenizer, list(r.prompt), r.response, cfg.max_length) for r in train.itertuples()]
    eval_rows = [encode_demonstration(tokenizer, list(r.prompt), r.response, cfg.max_length)
                 for r in evaluation.itertuples()]
    schedule = Schedule(len(rows), cfg.batch_size, cfg.grad_accum, cfg.epochs)
    total = schedule.total

    model = engine.prepare(build_sft_model(base_model_path, cfg, device, seed), cfg.activation_checkpointing)
    model.generation_config.pad_token_id = pad_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(params, cfg.learning_rate)

    selector = CheckpointSelector()
    if selection_reward_model is not None:
        assert_same_tokenizer(tokenizer, load_tokenizer(selection_reward_model), "SFT model and selection reward model")
        rm = engine.prepare(ScalarHeadModel.from_pretrained(selection_reward_model, device, torch.float32)
                            .eval().requires_grad_(False))
        prompts = [list(p) for p in load_prepared(prepared_dir, "prompts", split="validation")
                   .head(cfg.selection_prompts).prompt]
        selector = CheckpointSelector(rm, lambda m: mean_reward_of_greedy_responses(
            m, tokenizer, rm, prompts, cfg.selection_max_prompt_tokens, cfg.selection_max_new_tokens, engine=engine))
    evaluate = bool(eval_rows) or selector.reward_model is not None

    # a complete checkpoint of the same configuration and inputs in output_dir is resumed (sft.checkpoint_every > 0)
    config_hash = (f"{section_hash(cfg)}:{seed}:{model_cfg.precision}:{base_model_path}:{selection_reward_model}:"
                   f"{len(rows)}:{len(eval_rows)}")
    checkpoints = StageDir(output_dir).checkpoints
    history: list[dict[str, float]] = []
    step = 0
    found = latest_step(checkpoints, config_hash) if cfg.checkpoint_every > 0 else None
    if found is not None:
        folder, state = found
        _restore(folder, state, model, optimizer, selector)
        step, history = state["step"], state["history"]
        for s in range(1, step + 1):  # the resumed run's MLflow curves are complete
            figures = _logged_figures(history, s, cfg.logging_steps, total)
            if figures:
                log(figures, s)
        for entry in selector.history:
            log(_epoch_figures(entry, selector.reward_model is not None), int(entry.get("step", 0)))
    resumed_from = step

    model.train()
    with progress("SFT", total) as advance:
        if step:
            advance(step)
        while step < total:
            lr = cfg.learning_rate * lr_factor(step, total, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = schedule.step_rows(step, seed)
            tokens = sum(rows[i].label_tokens for batch in micro_batches for i in batch)  # of the whole step
            torch.manual_seed(step_seed(seed, step, "sft", here.rank))
            nll = torch.zeros((), dtype=torch.float64)
            correct = torch.zeros((), dtype=torch.float64)
            optimizer.zero_grad()
            for batch in micro_batches:
                mine = batch[here.rank :: here.size]
                ids, mask, labels = collate([rows[i] for i in mine or batch[:1]], pad_id)
                with engine.autocast():
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                # this worker's share of the step's mean over its global tokens; a stand-in counts for nothing
                loss = sft_loss(logits, labels.to(device), num_tokens=max(tokens, 1)) * (1.0 if mine else 0.0)
                (loss * here.size).backward()  # FSDP averages gradients over the workers
                nll += loss.detach().double().cpu()
                if mine:
                    correct += _correct_tokens(logits.detach(), labels.to(device)).double().cpu()
            grad_norm = _norm(torch.nn.utils.clip_grad_norm_(params, 1.0))
            optimizer.step()
            step += 1
            reduced = distributed.all_reduce(torch.stack([nll, correct]))
            figures = {"sft/loss": float(reduced[0]), "sft/token_accuracy": float(reduced[1]) / max(tokens, 1),
                       "sft/learning_rate": lr, "sft/grad_norm": grad_norm}
            history.append(figures)
            logged = _logged_figures(history, step, cfg.logging_steps, total)
            if logged:
                log(logged, step)
            advance(1, loss=figures["sft/loss"], lr=lr)
            if evaluate and schedule.ends_epoch(step):
                eval_loss = evaluation_loss(model, eval_rows, cfg.batch_size, pad_id, engine)
                selector.consider(model, eval_loss, schedule.epoch_of(step), step)
                log(_epoch_figures(selector.history[-1], selector.reward_model is not None), step)
            if cfg.checkpoint_every > 0 and (step % cfg.checkpoint_every == 0 or step == total):
                save_step(checkpoints, step, _checkpoint_tensors(model, optimizer, selector),
                          {"config_hash": config_hash, "step": step, "history": history,
                           "selector": selector.state(), "workers": here.size}, keep=2)

    train_loss = sum(h["sft/loss"] for h in history) / len(history)
    log({"sft/train_loss": train_loss}, total)
    metrics: dict[str, float | str] = {
        "train_loss": train_loss,
        "train_examples": float(len(rows)),
        "truncated_responses": float(sum(r.response_truncated for r in rows)),
        "steps": float(total),
        "resumed_from_step": float(resumed_from),
        "selection": selector.criterion,
        "workers": float(here.size),
    }
    if selector.best_epoch is not None:
        selector.restore(model)
        kept = next(h for h in selector.history if h["epoch"] == selector.best_epoch)
        metrics.update(selected_epoch=float(selector.best_epoch), eval_loss=kept["eval_loss"],
                       eval_perplexity=math.exp(min(kept["eval_loss"], 50.0)))
        if selector.reward_model is not None:
            metrics["selection_rm_score"] = selector.best

    model_dir = StageDir(output_dir).model
    _save_sft_model(model, engine, base_model_path, cfg, seed, model_dir, tokenizer)
    metrics["wall_s"] = time.time() - start
    return StageResult("sft", paths={"model": str(model_dir)}, metrics=metrics)
