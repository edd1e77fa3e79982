"""Stage 3: PPO against the reward model with a per-token KL penalty to the SFT model (InstructGPT §3.5
"Reinforcement learning", App. C.4; Stiennon et al. 2020; Ziegler et al. 2019).

One PPO step, in the order a reader expects (CleanRL-style, one function per phase):

1. **Rollout**: sample a batch of train prompts and one response each from the policy (temperature 1, no top-k/top-p).
2. **Score**: the RM scores each full response (read at its EOS token); log-probabilities of the response tokens under
   the policy (in fp32 read from the logits ``generate`` computed while sampling, else a policy forward) and the frozen
   reference (SFT) model; values from the value model (initialised from the RM).
3. **Rewards**: ``r_t = −β·(log π(a_t) − log π_ref(a_t))`` per token, plus the RM score on the last token
   (:func:`rlhf_pipeline.models.losses.per_token_kl_rewards`); a response cut by the length limit optionally gets a
   penalty instead of its score.
4. **Advantages**: GAE with γ = 1 (:func:`rlhf_pipeline.models.losses.gae`), whitened over the batch.
5. **Update**: ``ppo_epochs`` passes over shuffled minibatches with the clipped policy loss and the clipped value loss
   (:func:`rlhf_pipeline.models.losses.ppo_policy_loss`, :func:`rlhf_pipeline.models.losses.ppo_value_loss`); each
   minibatch drops the columns that are padding in all its rows (:func:`trim_padding`).

Policy and value model are separate networks with their own optimisers, as in the paper (a 6B value function for the
175B policy). Weights and optimizer states are fp32; compute is bf16 or fp32 (``model.precision``).

On N workers (:mod:`rlhf_pipeline.models.distributed`) ``ppo.batch_size`` stays the global batch: each worker samples
and scores its ``B / N`` episodes with the policy unsharded once for the whole rollout, the scored episodes are gathered
so every worker holds the same global batch (advantages, whitening, the KL controller and the logged figures are those
of the whole batch), and each minibatch of the global permutation is split over the workers, its losses divided by the
minibatch's global token count: N workers take the updates one process takes on the same episodes. With LoRA
(``ppo.lora.r > 0``) the reference is the policy with its adapters disabled.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from pydantic import Field, model_validator

from rlhf_pipeline.models import distributed
from rlhf_pipeline.models.distributed import Engine
from rlhf_pipeline.models.ema import EMA
from rlhf_pipeline.models.kl_controller import AdaptiveKLController, FixedKLController
from rlhf_pipeline.models.loading import assert_same_tokenizer, load_causal_lm, load_tokenizer, resolve_device
from rlhf_pipeline.models.lora import adapters_disabled, add_lora, merged
from rlhf_pipeline.models.losses import (
    gae,
    lm_loss,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_kl_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf_pipeline.models.policy import Rollout, response_logprobs, sample_responses
from rlhf_pipeline.models.reward_model import ScalarHeadModel
from rlhf_pipeline.models.tokens import chat_prompt_ids, pad_sequences
from rlhf_pipeline.tasks.checkpoints import (
    latest_step,
    load_step,
    restore_training_state,
    save_step,
    step_seed,
    training_state,
)
from rlhf_pipeline.tasks.datasets import load_prepared
from rlhf_pipeline.tasks.formats import transcript
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

WEIGHTS_NAME = "model.safetensors"


class PPOConfig(Section):
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
    kl_target: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, ge=1)
    clip_range: float = Field(0.2, gt=0, le=1)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    max_prompt_tokens: int = Field(128, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None
    max_grad_norm: float = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # EMA of the policy's weights (paper: 0.992); the EMA weights are saved
    # PPO-ptx (InstructGPT eq. 2): + ptx_coef * E_pretrain[log pi(x)]; 0 turns it off (paper: 27.8)
    ptx_coef: float = Field(0.0, ge=0)
    ptx_batch_size: int = Field(2, ge=1)
    ptx_max_tokens: int = Field(128, ge=2)
    ptx_source: str = Field("comparisons", min_length=1)  # chosen dialogues of the train comparisons, or a text/JSONL file path
    checkpoint_every: int = Field(0, ge=0)  # steps between checkpoints in output_dir/ppo/checkpoints (0: none)
    lora: LoraConfig = Field(default_factory=LoraConfig)  # LoRA on the policy and the value model; reference = adapters off
    activation_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30% slower)

    @model_validator(mode="after")
    def _check_minibatches(self) -> "PPOConfig":
        if self.top_k or self.top_p < 1.0:
            raise ValueError("ppo.top_k and ppo.top_p must stay off (0 and 1.0): PPO's ratio and per-token KL need the "
                             "log-probabilities of the distribution that sampled, and those are of the full softmax; "
                             "use ppo.temperature to sharpen or flatten it")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"ppo.mini_batch_size ({self.mini_batch_size}) must divide ppo.batch_size ({self.batch_size})")
        return self


@torch.no_grad()
def score_rollout(
    rollout: Rollout, policy, reference, value_model, reward_model, cfg: PPOConfig, kl_coef: float | None = None,
    engine: Engine | None = None,
) -> dict[str, torch.Tensor]:
    """Phase 2 and 3: everything the update needs, computed once without gradients.

    The policy's log-probabilities come from the rollout when it carries them (``Rollout.logprobs``: read from the
    logits ``generate`` computed while sampling, see :func:`rlhf_pipeline.models.policy.sample_responses`), else from a
    policy forward here. ``reference`` ``None`` means the policy with its LoRA adapters disabled (the frozen SFT
    weights). ``kl_coef`` overrides ``cfg.kl_coef`` (the adaptive controller's current β); ``engine`` sets the compute
    precision (default fp32).

    Returns:
        a dict of ``[B, R]`` float32 tensors ``logprobs``, ``ref_logprobs``, ``values``, ``rewards``, ``kl``, ``mask``
        and ``[B]`` tensors ``scores`` (RM score, before any penalty).
    """
    ids, attn, p = rollout.input_ids, rollout.attention_mask, rollout.query_length
    mask = rollout.response_mask.float()
    with engine.autocast() if engine is not None else contextlib.nullcontext():
        if rollout.logprobs is not None:
            logprobs = rollout.logprobs
        else:
            logprobs, _ = response_logprobs(policy, ids, attn, p, cfg.temperature)
        if reference is None:
            with adapters_disabled(policy):
                ref_logprobs, _ = response_logprobs(policy, ids, attn, p, cfg.temperature)
        else:
            ref_logprobs, _ = response_logprobs(reference, ids, attn, p, cfg.temperature)
        values = value_model.values(ids, attn)[:, p - 1 : -1]
        scores = reward_model.score(ids, attn, rollout.sequence_response_mask)
    penalised = scores.clone()
    if cfg.missing_eos_penalty is not None:
        penalised = torch.where(rollout.ended, scores, torch.full_like(scores, cfg.missing_eos_penalty))
    beta = cfg.kl_coef if kl_coef is None else kl_coef
    rewards, kl = per_token_kl_rewards(penalised, logprobs, ref_logprobs, mask, beta)
    return {
        "logprobs": logprobs * mask,
        "ref_logprobs": ref_logprobs * mask,
        "values": values * mask,
        "rewards": rewards,
        "kl": kl,
        "mask": mask,
        "scores": scores,
    }


def gather_episodes(rollout: Rollout, batch: dict[str, torch.Tensor], pad_id: int) -> tuple[Rollout, dict]:
    """Every worker's scored episodes as one global rollout in rank order (queries left-padded, responses
    right-padded to the widest): the batch one process would hold. The identity in one process.

    Args:
        rollout: this worker's ``[b, P_r + R_r]`` episodes.
        batch: its :func:`score_rollout` tensors (``[b, R_r]`` and ``[b]``).
        pad_id: the tokenizer's pad id.

    Returns:
        ``(rollout [B, P + R], batch)`` with ``B`` the sum of the workers' ``b``.
    """
    if distributed.world().size == 1:
        return rollout, batch
    parts = distributed.gather_objects((rollout.input_ids[:, : rollout.query_length].cpu(),
                                        rollout.attention_mask[:, : rollout.query_length].cpu(),
                                        rollout.responses.cpu(), rollout.response_mask.cpu(), rollout.ended.cpu(),
                                        rollout.logprobs.cpu() if rollout.logprobs is not None else None,
                                        {k: v.cpu() for k, v in batch.items()}))  # one collective for everything
    device = rollout.input_ids.device

    def joined(i: int, pad, left: bool = False) -> torch.Tensor:
        tensors = [part[i] for part in parts]
        if tensors[0].dim() > 1:
            width = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]),
                                               value=pad) for t in tensors]
        return torch.cat(tensors).to(device)

    queries, query_mask = joined(0, pad_id, left=True), joined(1, 0, left=True)
    responses, response_mask = joined(2, pad_id), joined(3, 0)
    full = Rollout(
        input_ids=torch.cat([queries, responses], 1),
        attention_mask=torch.cat([query_mask, response_mask], 1),
        query_length=queries.shape[1],
        response_mask=response_mask,
        ended=joined(4, False),
        logprobs=joined(5, 0.0) if rollout.logprobs is not None else None,
    )
    merged_batch = {}
    for key in batch:
        tensors = [part[6][key] for part in parts]
        width = max(t.shape[1] for t in tensors) if tensors[0].dim() > 1 else None
        if width is not None:
            tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors]
        merged_batch[key] = torch.cat(tensors).to(device)
    return full, merged_batch


def trim_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, query_length: int, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Drop the columns that are padding in every row of a (mini)batch: leading query columns (queries are
    left-padded to the whole rollout's longest) and trailing response columns (responses right-padded).

    Returns ``(input_ids, attention_mask, query_length, response_width)`` of the trimmed batch; the response tensors of
    the minibatch are then ``[:, :response_width]``. Masked positions take no part in attention, position ids count
    real tokens only and every loss is a masked mean, so losses and gradients are those of the untrimmed batch (up to
    float rounding); only the work on all-padding columns is saved.
    """
    real_query = attention_mask[:, :query_length].any(0)
    first = int(real_query.long().argmax()) if bool(real_query.any()) else query_length
    real_response = response_mask.any(0)
    width = int(real_response.nonzero().max()) + 1 if bool(real_response.any()) else response_mask.shape[1]
    end = query_length + width
    return input_ids[:, first:end], attention_mask[:, first:end], query_length - first, width


def _norm(value) -> float:
    """A gradient norm as a float (FSDP returns a DTensor)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def ppo_update(
    rollout: Rollout,
    batch: dict[str, torch.Tensor],
    advantages: torch.Tensor,
    returns: torch.Tensor,
    policy,
    value_model,
    policy_opt: torch.optim.Optimizer,
    value_opt: torch.optim.Optimizer,
    cfg: PPOConfig,
    generator: torch.Generator,
    ptx_batches=None,
    engine: Engine | None = None,
) -> dict[str, float]:
    """Phase 5: ``ppo_epochs`` passes of minibatch updates; returns the mean of each statistic over minibatches.

    ``rollout``, ``batch``, ``advantages`` and ``returns`` are the *global* batch (the same on every worker); each
    minibatch of the permutation drawn from ``generator`` (the same on every worker) is split over the workers, and
    its losses are divided by its global number of response tokens and multiplied by the number of workers (FSDP
    averages gradients), so N workers take the step one process takes. With ``ptx_batches`` (an iterator of global
    ``(input_ids, attention_mask)`` batches of pretraining text) and ``cfg.ptx_coef > 0`` the policy loss gains
    ``ptx_coef`` times the LM loss on one such batch per minibatch (PPO-ptx, InstructGPT eq. 2).

    Raises:
        ValueError: when a minibatch or a PPO-ptx batch does not split evenly over the workers.
    """
    engine = engine or Engine(distributed.World(), torch.float32)
    here = engine.world
    n = rollout.input_ids.shape[0]
    stats: dict[str, list[float]] = {}
    policy.train()
    value_model.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.mini_batch_size):
            minibatch = order[start : start + cfg.mini_batch_size]
            idx = minibatch[here.rows(len(minibatch), "ppo.mini_batch_size")].to(rollout.input_ids.device)
            ids, attn, p, r = trim_padding(rollout.input_ids[idx], rollout.attention_mask[idx],
                                           rollout.query_length, rollout.response_mask[idx])
            mask = batch["mask"][idx, :r]
            tokens = distributed.all_reduce(mask.sum()) if here.size > 1 else None
            with engine.autocast():
                logprobs, entropy = response_logprobs(policy, ids, attn, p, cfg.temperature, with_entropy=True)
                values = value_model.values(ids, attn)[:, p - 1 : -1]
            pg_loss, pg_stats = ppo_policy_loss(logprobs, batch["logprobs"][idx, :r], advantages[idx, :r], mask,
                                                cfg.clip_range, num_tokens=tokens)
            vf_loss, vf_stats = ppo_value_loss(values, batch["values"][idx, :r], returns[idx, :r], mask,
                                               cfg.clip_range_value, num_tokens=tokens)

            loss = pg_loss
            ptx = None
            if ptx_batches is not None and cfg.ptx_coef > 0:
                ptx_ids, ptx_mask = next(ptx_batches)
                rows = here.rows(ptx_ids.shape[0], "ppo.ptx_batch_size")
                ptx_ids, ptx_mask = ptx_ids[rows], ptx_mask[rows]
                ptx_tokens = distributed.all_reduce(ptx_mask[:, 1:].sum()) if here.size > 1 else None
                with engine.autocast():
                    ptx_logits = policy(input_ids=ptx_ids, attention_mask=ptx_mask, use_cache=False).logits
                ptx = lm_loss(ptx_logits, ptx_ids, ptx_mask, num_tokens=ptx_tokens)
                loss = pg_loss + cfg.ptx_coef * ptx

            policy_opt.zero_grad()
            (loss * here.size).backward()
            pg_grad = _norm(torch.nn.utils.clip_grad_norm_(_trainable(policy), cfg.max_grad_norm))
            policy_opt.step()
            value_opt.zero_grad()
            (cfg.vf_coef * vf_loss * here.size).backward()
            torch.nn.utils.clip_grad_norm_(_trainable(value_model), cfg.max_grad_norm)
            value_opt.step()

            partial = {  # each worker's share of a mean over the minibatch's global tokens: they add up
                "policy_loss": pg_loss,
                "value_loss": vf_loss,
                "entropy": masked_mean(entropy, mask, total=tokens),
                **pg_stats,
                **vf_stats,
                **({"ptx_loss": ptx} if ptx is not None else {}),
            }
            summed = distributed.all_reduce(torch.stack([v.detach().float().cpu() for v in partial.values()]))
            for key, value in zip(partial, summed.tolist()):
                stats.setdefault(key, []).append(value)
            stats.setdefault("grad_norm", []).append(pg_grad)
    policy.eval()
    value_model.eval()
    return {k: sum(v) / len(v) for k, v in stats.items()}


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def pretraining_texts(source: str, prepared_dir: str | Path, split: str = "train") -> list[str]:
    """Texts for PPO-ptx (``split="train"``) and the alignment-tax perplexity (``split="test"``) from ``source`` (the
    ``ppo.ptx_source`` setting): the chosen dialogues of the comparisons (``comparisons``), the demonstrations
    (``demonstrations``), or the lines / JSON-lines ``text`` fields of a file (all of it, whatever the split).

    Raises:
        FileNotFoundError: when ``ptx_source`` is neither a known name nor an existing file.
    """
    if source == "comparisons":
        frame = load_prepared(prepared_dir, "comparisons", split=split)
        return [transcript(list(r.prompt), r.responses[0]) for r in frame.itertuples()]
    if source == "demonstrations":
        frame = load_prepared(prepared_dir, "demonstrations", split=split)
        return [transcript(list(r.prompt), r.response) for r in frame.itertuples()]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"ppo.ptx_source: no such file {path} (or use 'comparisons' / 'demonstrations')")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in lines]
    return lines


def pretraining_batches(texts: list[str], tokenizer, batch_size: int, max_tokens: int, generator: torch.Generator,
                        device: torch.device):
    """An endless iterator of ``(input_ids [B, T], attention_mask [B, T])`` over ``texts`` (right-padded): the texts
    in a shuffled order, then a new shuffled order, and so on, so a batch may span two passes (with fewer texts than
    ``batch_size`` a text repeats within a batch).

    Raises:
        ValueError: when there are no texts.
    """
    if not texts:
        raise ValueError("PPO-ptx has no pretraining texts (ppo.ptx_source); set ppo.ptx_coef to 0 or give texts")
    stream: list[int] = []
    while True:
        while len(stream) < batch_size:
            stream += torch.randperm(len(texts), generator=generator).tolist()
        picked, stream = stream[:batch_size], stream[batch_size:]
        ids = [tokenizer(texts[i], add_special_tokens=False)["input_ids"][:max_tokens] for i in picked]
        input_ids, mask = pad_sequences(ids, tokenizer.pad_token_id, side="right")
        yield input_ids.to(device), mask.to(device)


class _Counting:
    """Wraps an iterator and counts the items drawn (so a resumed run can fast-forward the PPO-ptx stream)."""

    def __init__(self, iterator, skip: int = 0):
        self.iterator, self.count = iterator, 0
        for _ in range(skip):
            next(self)

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        return next(self.iterator)


def prompt_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The global batch of prompt indices of PPO step ``step`` (1-based): consecutive slices of a stream of seeded
    permutations of the ``n`` prompts, one permutation per pass over them (no state to carry across a resume)."""
    start, picked = (step - 1) * batch_size, []
    epoch, position = divmod(start, n)
    while len(picked) < batch_size:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, "prompts"))).tolist()
        picked += perm[position : position + batch_size - len(picked)]
        epoch, position = epoch + 1, 0
    return picked


def adamw(params, lr: float) -> torch.optim.AdamW:
    """AdamW (eps 1e-5, no weight decay) with torch's fused single-pass kernel where it exists (CPU and CUDA floating
    point parameters; what transformers' Trainer, and so TRL, uses by default), else the per-tensor loop (sharded
    DTensor parameters). The same update rule either way; the fused kernel reads and writes each parameter's state
    once instead of once per op."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point and type(p) is torch.nn.Parameter
                for p in params)
    return torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=0.0, fused=fused or None)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 − Var[R − V] / Var[R]`` over the masked tokens (1 is perfect, ≤ 0 is no better than a constant)."""
    var_returns = masked_var(returns, mask)
    return float(1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8))


def build_policy(path: str | Path, cfg: PPOConfig, device: torch.device):
    """The policy before training: the SFT model in fp32 (the master weights), with LoRA adapters when
    ``ppo.lora.r > 0``."""
    policy = load_causal_lm(path, device, torch.float32)
    if cfg.lora.r:
        policy = add_lora(policy, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    return policy


def build_value_model(path: str | Path, cfg: PPOConfig, device: torch.device) -> ScalarHeadModel:
    """The value model before training: the reward model in fp32 (InstructGPT §3.5: the value function is initialised
    from the RM), with LoRA adapters (and its head trained whole) when ``ppo.lora.r > 0``."""
    value_model = ScalarHeadModel.from_pretrained(path, device, torch.float32)
    if cfg.lora.r:
        value_model.seq_cls = add_lora(value_model.seq_cls, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                                       cfg.lora.target_modules, scalar_head=True)
    return value_model


def _save_policy(policy, engine: Engine, path: str | Path, cfg: PPOConfig, folder: Path, tokenizer) -> None:
    """Write the trained policy as a plain transformers folder (LoRA merged, fp32) on worker 0."""
    if not distributed.is_wrapped(policy):
        merged(policy).save_pretrained(folder, safe_serialization=True)
    else:
        state = distributed.full_state_dict(policy)
        if engine.world.is_main:
            plain = build_policy(path, cfg, torch.device("cpu"))
            plain.load_state_dict(state)
            merged(plain).save_pretrained(folder, safe_serialization=True)
    if engine.world.is_main:
        tokenizer.save_pretrained(folder)
    distributed.barrier()


def run_ppo(
    cfg: PPOConfig,
    model_cfg: ModelConfig,
    prepared_dir: str | Path,
    sft_model_path: str | Path,
    reward_model_path: str | Path,
    output_dir: str | Path,
    log: MetricLogger = no_log,
) -> StageResult:
    """Train the policy with PPO from the SFT model against the reward model; save it to ``output_dir/model``.

    Args:
        cfg: the ``ppo`` section.
        model_cfg: the ``model`` section (seed, device, precision).
        prepared_dir: folder with ``prompts.parquet`` (train prompts are used).
        sft_model_path: initialises the policy and the frozen reference model.
        reward_model_path: the RM (frozen) and the value model's initialisation.
        output_dir: where the policy is saved.
        log: receives the ``ppo/*`` step metrics (score, kl, reward, entropy, approx_kl, clipfrac, value_loss,
            policy_loss, explained_variance, response_length, learning_rate...).

    Returns:
        StageResult with ``paths.model`` and metrics ``kl`` (mean summed per-token KL to the reference over the last
        step, nats), ``mean_reward`` (mean RM score of the last step's rollouts), ``mean_reward_first`` (the same at step
        1), ``mean_total_reward``, ``response_length``, ``episodes``, ``steps``, ``workers``, ``wall_s``.

    Checkpoints (``ppo.checkpoint_every`` > 0) go to ``output_dir/checkpoints`` (:mod:`rlhf_pipeline.tasks.checkpoints`:
    sharded weights and optimizer states, the EMA, the step, KL coefficient, PPO-ptx position and history); a later
    call with the same configuration, inputs and ``output_dir`` resumes from the newest one, on any number of workers,
    and with the same number ends with the same metrics as an uninterrupted run on CPU.

    Raises:
        ValueError: when policy and reward model do not share a tokenizer, there are no train prompts, or a batch does
            not split over the workers.
    """
    start = time.time()
    output_dir = Path(output_dir)
    seed = model_cfg.seed
    seed_everything(seed)
    engine = Engine.create(resolve_device(model_cfg.device), model_cfg.precision)
    here, device = engine.world, engine.device
    local = here.rows(cfg.batch_size, "ppo.batch_size")
    here.rows(cfg.mini_batch_size, "ppo.mini_batch_size")

    tokenizer = load_tokenizer(sft_model_path)
    assert_same_tokenizer(tokenizer, load_tokenizer(reward_model_path), "policy and reward model")
    prompts = load_prepared(prepared_dir, "prompts", split="train")
    if len(prompts) == 0:
        raise ValueError(f"no train prompts in {prepared_dir}")
    queries = [chat_prompt_ids(tokenizer, list(p), cfg.max_prompt_tokens) for p in prompts.prompt]

    policy = engine.prepare(build_policy(sft_model_path, cfg, device), cfg.activation_checkpointing)
    reference = None  # LoRA: the policy with its adapters disabled
    if not cfg.lora.r:
        reference = engine.prepare(load_causal_lm(sft_model_path, device, torch.float32).eval().requires_grad_(False))
    reward_model = engine.prepare(
        ScalarHeadModel.from_pretrained(reward_model_path, device, torch.float32).eval().requires_grad_(False))
    value_model = engine.prepare(build_value_model(reward_model_path, cfg, device), cfg.activation_checkpointing)
    policy.eval()
    value_model.eval()
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy_opt = adamw(_trainable(policy), cfg.learning_rate)
    value_opt = adamw(_trainable(value_model), cfg.value_learning_rate)

    # the rollout's old log-probabilities come from generate's logits (no policy forward in scoring) in fp32, where
    # the cached incremental pass and a full-sequence pass agree to 2e-5 nats a token or better (SmolLM2: mean
    # 2.5e-6); in bf16 they round differently by far more, which would show up as spurious KL to the reference and
    # ratios != 1 at step 1, so there the separate forward stays
    logprobs_from_generate = engine.dtype == torch.float32
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    ema = EMA(policy, cfg.ema_decay) if cfg.ema_decay else None
    history: list[dict[str, float]] = []
    first_step, ptx_drawn = 1, 0

    # a checkpoint of the same configuration and inputs in output_dir is resumed (ppo.checkpoint_every > 0)
    config_hash = f"{section_hash(cfg)}:{seed}:{model_cfg.precision}:{sft_model_path}:{reward_model_path}"
    checkpoints = StageDir(output_dir).checkpoints
    found = latest_step(checkpoints, config_hash) if cfg.checkpoint_every > 0 else None
    if found is not None:
        folder, state = found
        tensors = _checkpoint_tensors(policy, policy_opt, value_model, value_opt, ema)
        load_step(folder, tensors)
        _restore(tensors, policy, policy_opt, value_model, value_opt, ema)
        kl_ctl.value = state["kl_coef"]
        history, first_step, ptx_drawn = state["history"], state["step"] + 1, state["ptx_drawn"]
        for step, figures in enumerate(history, start=1):  # the resumed run's MLflow curve is complete
            log(figures, step)
    ptx_batches = None
    if cfg.ptx_coef > 0:
        ptx_batches = _Counting(pretraining_batches(pretraining_texts(cfg.ptx_source, prepared_dir), tokenizer,
                                                    cfg.ptx_batch_size, cfg.ptx_max_tokens,
                                                    torch.Generator().manual_seed(seed + 1), device),
                                skip=ptx_drawn)
    with progress("PPO", cfg.steps) as advance:
        if first_step > 1:
            advance(first_step - 1)
        for step in range(first_step, cfg.steps + 1):
            picked = prompt_indices(step, cfg.batch_size, len(queries), seed)[local]
            torch.manual_seed(step_seed(seed, step, "sample", here.rank))
            with torch.no_grad(), distributed.gathered(policy), engine.autocast():
                rollout = sample_responses(policy, tokenizer, [queries[i] for i in picked], cfg.max_new_tokens,
                                           cfg.temperature, cfg.top_k, cfg.top_p,
                                           with_logprobs=logprobs_from_generate)
            beta = kl_ctl.value
            batch = score_rollout(rollout, policy, reference, value_model, reward_model, cfg, kl_coef=beta,
                                  engine=engine)
            rollout, batch = gather_episodes(rollout, batch, tokenizer.pad_token_id)
            advantages, returns = gae(batch["rewards"], batch["values"], batch["mask"], cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, batch["mask"])
            generator = torch.Generator().manual_seed(step_seed(seed, step, "minibatches"))
            update = ppo_update(rollout, batch, advantages, returns, policy, value_model, policy_opt, value_opt, cfg,
                                generator, ptx_batches, engine)
            if ema is not None:
                ema.update(policy)

            mask = batch["mask"]
            figures = {
                "ppo/score": float(batch["scores"].mean()),
                "ppo/kl": float(batch["kl"].sum(1).mean()),
                "ppo/reward": float(batch["rewards"].sum(1).mean()),
                "ppo/response_length": float(mask.sum(1).mean()),
                "ppo/ended_with_eos": float(rollout.ended.float().mean()),
                "ppo/advantage_mean": float(masked_mean(advantages, mask)),
                "ppo/value_mean": float(masked_mean(batch["values"], mask)),
                "ppo/explained_variance": explained_variance(batch["values"], returns, mask),
                "ppo/learning_rate": policy_opt.param_groups[0]["lr"],
                "ppo/kl_coef": beta,
                **{f"ppo/{k}": v for k, v in update.items()},
            }
            kl_ctl.update(figures["ppo/kl"], cfg.batch_size)
            history.append(figures)
            log(figures, step)
            advance(1, score=figures["ppo/score"], kl=figures["ppo/kl"], clip=figures["ppo/clipfrac"])
            if cfg.checkpoint_every > 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                save_step(checkpoints, step, _checkpoint_tensors(policy, policy_opt, value_model, value_opt, ema), {
                    "config_hash": config_hash, "step": step, "history": history, "kl_coef": kl_ctl.value,
                    "ptx_drawn": ptx_batches.count if ptx_batches is not None else 0, "workers": here.size,
                }, keep=1)

    if ema is not None:
        ema.copy_to(policy)
    layout = StageDir(output_dir)
    if here.is_main:
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.history.write_text(json.dumps(history, indent=1))
    _save_policy(policy, engine, sft_model_path, cfg, layout.model, tokenizer)
    last, first = history[-1], history[0]
    metrics = {
        "kl": last["ppo/kl"],
        "mean_reward": last["ppo/score"],
        "mean_reward_first": first["ppo/score"],
        "mean_total_reward": last["ppo/reward"],
        "response_length": last["ppo/response_length"],
        "clipfrac": last["ppo/clipfrac"],
        "approx_kl": last["ppo/approx_kl"],
        "episodes": float(cfg.steps * cfg.batch_size),
        "steps": float(cfg.steps),
        "resumed_from_step": float(first_step - 1),
        "workers": float(here.size),
        "wall_s": time.time() - start,
    }
    return StageResult("ppo", paths={"model": str(layout.model), "history": str(layout.history)},
                       metrics=metrics)


def _checkpoint_tensors(policy, policy_opt, value_model, value_opt, ema: EMA | None) -> dict:
    """What a PPO checkpoint holds as tensors: the trainable weights and optimizer states of the policy and the value
    model (:func:`rlhf_pipeline.tasks.checkpoints.training_state`), and the EMA shadow."""
    tensors = {"policy": training_state(policy, policy_opt), "value": training_state(value_model, value_opt)}
    if ema is not None:
        tensors["ema"] = ema.shadow
    return tensors


def _restore(tensors: dict, policy, policy_opt, value_model, value_opt, ema: EMA | None) -> None:
    restore_training_state(policy, policy_opt, tensors["policy"])
    restore_training_state(value_model, value_opt, tensors["value"])
    if ema is not None:
        ema.shadow = tensors["ema"]
