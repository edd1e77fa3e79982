"""PPO throughput: our PPO (tasks/ppo.py) against TRL 1.12's experimental ``PPOTrainer``, same settings, this machine.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python benchmarks/ppo_throughput.py --model tiny            # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/ppo_throughput.py --model smollm2         # ~10-15 minutes on 2 CPU cores
    .venv/bin/python benchmarks/ppo_throughput.py --model both --repeats 2

TRL removed ``PPOTrainer`` in 1.13, so the TRL side runs in its own throwaway virtualenv (``benchmarks/.trl112-venv``,
git-ignored), created on first use with ``trl==1.12.0`` and the same torch / transformers versions as the project's
virtualenv (pinned below), and reused afterwards. Each side runs in its own subprocess (``--worker ours|trl``) and
prints one JSON result line; this parent prints the table.

What is compared (both sides get the same settings from one JSON spec):

* the same policy (tiny random Llama, or SmolLM2-135M-Instruct), the same reward model (an RM folder built from the
  policy with a seeded random scalar head; also the value model's initialisation on both sides), fp32 on CPU, the same
  number of torch threads, no gradient checkpointing, no bf16;
* the same train prompts (chat-templated with the project's ``chat_prompt_ids``, left-truncated to
  ``--max-prompt-tokens``; TRL gets exactly the multiset of prompts our run samples, in its own shuffled order);
* batch size B episodes per rollout, response length R, ``--ppo-epochs`` passes of B/M minibatches of M episodes
  with one optimizer step per minibatch (TRL: ``per_device_train_batch_size=B``, ``gradient_accumulation_steps=1``,
  ``num_mini_batches=B/M``, ``local_rollout_forward_batch_size=B``), sampling temperature 1.0 with no top-k / top-p,
  fixed KL coefficient 0.02 (k1 estimator), GAE gamma 1 / lambda 0.95, clip 0.2 / 0.2, vf_coef 0.1, AdamW at a
  constant learning rate (TRL: ``lr_scheduler_type="constant"``, ``adam_epsilon=1e-5`` like ours), no EOS penalty.

Timing: each side records a timestamp at the end of every PPO step (our ``log`` callback, TRL's ``on_step_end``);
episodes/s = B * (N - 1) / (t_N - t_1), i.e. step 1 (warm-up) and model loading are excluded. Generation tokens/s is
the number of real response tokens (up to and including EOS) over the time spent in the rollout's ``generate`` call,
over the same steps 2..N.

Score: the mean RM score of the rollouts, as each side logs it (``ppo/score``, ``objective/scores``), for the first
step and averaged over the last ``max(1, N // 4)`` steps. Both read the same RM at the response's EOS token (TRL gets a
pad token distinct from EOS for this, see ``_trl_worker``). Scores from a random-head RM only say that both sides
optimise the same objective equally well; they are not a quality measure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / "benchmarks" / ".trl112-venv"
# the TRL side gets the project's torch / transformers / accelerate / datasets versions, so only the trainer differs
TRL_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "accelerate==1.15.0", "datasets==5.2.0", "trl==1.12.0"]
RESULT_PREFIX = "BENCH_RESULT "


# ----------------------------------------------------------------------------------------------------------- workers


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def _rates(step_times: list[float], gen: list[tuple[float, int]], batch_size: int) -> dict:
    """Episodes/s and generation tokens/s over steps 2..N (step 1 is warm-up)."""
    steps = len(step_times)
    out = {"steps": steps, "wall_steps_s": step_times[-1] - step_times[0] if steps > 1 else float("nan")}
    if steps > 1:
        out["episodes_per_s"] = batch_size * (steps - 1) / (step_times[-1] - step_times[0])
    if len(gen) > 1:
        gen_s = sum(t for t, _ in gen[1:])
        out["gen_tokens_per_s"] = sum(n for _, n in gen[1:]) / gen_s
        out["gen_share"] = gen_s / out["wall_steps_s"] if steps > 1 else float("nan")
    out["response_tokens_mean"] = sum(n for _, n in gen) / (batch_size * len(gen)) if gen else float("nan")
    return out


def _score_summary(scores: list[float]) -> dict:
    k = max(1, len(scores) // 4)
    return {"score_first": scores[0], "score_last": sum(scores[-k:]) / k, "scores": scores}


def _ours_worker(spec: dict) -> dict:
    _set_threads(spec["threads"])
    import rlhf_pipeline.tasks.ppo as ppo
    from rlhf_pipeline.flows.config import load_config

    overrides = [
        f"model.base={spec['policy']}", "model.device=cpu", f"model.seed={spec['seed']}",
        f"ppo.steps={spec['steps']}", f"ppo.batch_size={spec['batch_size']}",
        f"ppo.mini_batch_size={spec['mini_batch_size']}", f"ppo.ppo_epochs={spec['ppo_epochs']}",
        f"ppo.max_new_tokens={spec['response_length']}", f"ppo.max_prompt_tokens={spec['max_prompt_tokens']}",
        f"ppo.learning_rate={spec['lr']}", f"ppo.value_learning_rate={spec['lr']}", f"ppo.kl_coef={spec['kl_coef']}",
        "ppo.adaptive_kl=false", "ppo.temperature=1.0", "ppo.top_k=0", "ppo.top_p=1.0", "ppo.missing_eos_penalty=null",
        "ppo.ptx_coef=0", "ppo.ema_decay=null", "ppo.checkpoint_every=0", "ppo.whiten_advantages=true",
        "ppo.gamma=1.0", "ppo.lam=0.95", "ppo.clip_range=0.2", "ppo.clip_range_value=0.2", "ppo.vf_coef=0.1",
    ]
    config = load_config(ROOT / "params.yaml", "demo", overrides)

    gen: list[tuple[float, int]] = []
    original = ppo.sample_responses

    def timed_sample(*args, **kwargs):
        t0 = time.perf_counter()
        rollout = original(*args, **kwargs)
        gen.append((time.perf_counter() - t0, int(rollout.response_mask.sum())))
        return rollout

    ppo.sample_responses = timed_sample  # run_ppo looks the name up in its module at call time
    phases: dict[str, list[float]] = {}
    for name in ("score_rollout", "ppo_update"):  # where the rest of a step goes
        def timed(*a, _f=getattr(ppo, name), _n=name, **kw):
            t = time.perf_counter()
            out = _f(*a, **kw)
            phases.setdefault(_n, []).append(time.perf_counter() - t)
            return out
        setattr(ppo, name, timed)
    step_times: list[float] = []
    scores: list[float] = []
    lengths: list[float] = []

    def log(metrics: dict, step: int) -> None:
        step_times.append(time.perf_counter())
        scores.append(metrics["ppo/score"])
        lengths.append(metrics["ppo/response_length"])

    t0 = time.perf_counter()
    ppo.run_ppo(config.ppo, config.model, spec["prepared_dir"], spec["policy"], spec["reward_model"], spec["output_dir"], log)
    return {"side": "ours", "total_s": time.perf_counter() - t0, "logged_response_length": sum(lengths) / len(lengths),
            "phase_s_per_step": {k: sum(v[1:]) / max(1, len(v) - 1) for k, v in phases.items()},
            **_rates(step_times, gen, spec["batch_size"]), **_score_summary(scores)}


def _trl_worker(spec: dict) -> dict:
    _set_threads(spec["threads"])
    import torch
    import trl
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    # TRL finds padding by token id (``attention_mask = ids != pad``). With this tokenizer's pad == EOS
    # (<|im_end|>) it would mask the <|im_end|> tokens inside every chat prompt and read the RM one token before the
    # EOS. <|endoftext|> (id 0) is in the vocabulary (unk), never occurs in the templated prompts, and needs no
    # embedding resize; with it TRL masks exactly the padding and reads the RM at the EOS, as ours does.
    tokenizer.pad_token = tokenizer.unk_token or "<|endoftext|>"
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise RuntimeError("need a pad token distinct from EOS for TRL")
    with open(spec["queries_file"]) as fh:
        queries = json.load(fh)
    if any(tokenizer.pad_token_id in q for q in queries):
        raise RuntimeError("the TRL pad token occurs in a prompt")
    dataset = Dataset.from_dict({"input_ids": queries})

    fp32 = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], **fp32)
    ref_policy = AutoModelForCausalLM.from_pretrained(spec["policy"], **fp32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, **fp32)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, **fp32)
    for model in (policy, ref_policy):
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    for model in (reward_model, value_model):
        model.config.pad_token_id = tokenizer.pad_token_id

    b, m = spec["batch_size"], spec["mini_batch_size"]
    args = PPOConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=b,
        gradient_accumulation_steps=1,
        num_mini_batches=b // m,
        num_ppo_epochs=spec["ppo_epochs"],
        local_rollout_forward_batch_size=b,
        total_episodes=spec["steps"] * b,
        response_length=spec["response_length"],
        stop_token="eos",
        missing_eos_penalty=None,
        temperature=1.0,
        kl_coef=spec["kl_coef"],
        kl_estimator="k1",
        whiten_rewards=False,
        gamma=1.0,
        lam=0.95,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        adam_epsilon=1e-5,
        weight_decay=0.0,
        warmup_steps=0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        num_sample_generations=0,
        save_strategy="no",
        logging_steps=1,
        seed=spec["seed"],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    gen: list[tuple[float, int]] = []
    original = trl_ppo.batch_generation
    eos = tokenizer.eos_token_id

    def timed_generation(model, queries, *a, **kw):
        t0 = time.perf_counter()
        query_responses, logits = original(model, queries, *a, **kw)
        elapsed = time.perf_counter() - t0
        responses = query_responses[:, queries.shape[1]:]
        # real tokens: up to and including the first EOS (the same count as ours)
        is_eos = responses == eos
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        gen.append((elapsed, int((~after).sum())))
        return query_responses, logits

    trl_ppo.batch_generation = timed_generation
    step_times: list[float] = []
    scores: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                scores.append(float(logs["objective/scores"]))

    t0 = time.perf_counter()
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy, reward_model=reward_model,
        train_dataset=dataset, eval_dataset=dataset.select(range(min(8, len(dataset)))), value_model=value_model,
        callbacks=[Timer()],
    )
    trainer.train()
    return {"side": "trl", "trl_version": trl.__version__, "total_s": time.perf_counter() - t0,
            **_rates(step_times, gen, b), **_score_summary(scores)}


def _worker_main(side: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = _ours_worker(spec) if side == "ours" else _trl_worker(spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------------ parent


def ensure_trl_venv(venv: Path) -> Path:
    """The throwaway virtualenv with TRL 1.12 (created once, reused while it imports PPOTrainer)."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import trl; from trl.experimental.ppo import PPOTrainer; print(trl.__version__)"]
    if python.exists():
        proc = subprocess.run(check, capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip().splitlines()[-1:] == ["1.12.0"]:
            return python
        print(f"[bench] {venv} is unusable ({proc.stderr.strip()[-200:]}); recreating it", flush=True)
        shutil.rmtree(venv)
    print(f"[bench] creating {venv} with {' '.join(TRL_REQUIREMENTS)} (about a minute)", flush=True)
    # the base interpreter of the running venv (a venv's own python would nest)
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    *TRL_REQUIREMENTS], check=True)
    subprocess.run(check, check=True, capture_output=True)
    return python


def prepare_inputs(model: str, work: Path, args) -> dict:
    """Model folders, the shared RM folder and the prompt ids; returns the spec both workers get."""
    import torch
    from transformers import AutoTokenizer

    from rlhf_pipeline.models.loading import ensure_smollm2, ensure_tiny_random
    from rlhf_pipeline.models.reward_model import ScalarHeadModel
    from rlhf_pipeline.models.tokens import chat_prompt_ids
    from rlhf_pipeline.tasks.datasets import load_prepared

    prepared = Path(args.prepared_dir)
    if not (prepared / "prompts.parquet").exists():
        print(f"[bench] preparing data into {prepared}", flush=True)
        subprocess.run([sys.executable, "-m", "rlhf_pipeline.flows.cli", "prepare"], cwd=ROOT, check=True)
    policy = ensure_tiny_random() if model == "tiny" else ensure_smollm2()
    rm_dir = work / f"rm-{model}"
    if not (rm_dir / "config.json").exists():
        torch.manual_seed(args.seed)  # the random scalar head: the same RM for both sides
        ScalarHeadModel.from_pretrained(policy, torch.device("cpu")).save_pretrained(rm_dir)
        AutoTokenizer.from_pretrained(policy).save_pretrained(rm_dir)

    steps = args.episodes // args.batch_size
    tokenizer = AutoTokenizer.from_pretrained(policy)
    prompts = load_prepared(prepared, "prompts", split="train")
    queries = [chat_prompt_ids(tokenizer, list(p), args.max_prompt_tokens) for p in prompts.prompt]
    # the prompts our run draws (tasks/ppo.py: randperm with the run's seed), so TRL trains on the same set
    if steps * args.batch_size <= len(queries):
        order = torch.randperm(len(queries), generator=torch.Generator().manual_seed(args.seed)).tolist()
        queries = [queries[i] for i in order[: steps * args.batch_size]]
    queries_file = work / f"queries-{model}.json"
    queries_file.write_text(json.dumps(queries))
    return {
        "model": model, "policy": str(policy), "reward_model": str(rm_dir), "prepared_dir": str(prepared),
        "queries_file": str(queries_file), "steps": steps, "batch_size": args.batch_size,
        "mini_batch_size": args.mini_batch_size, "ppo_epochs": args.ppo_epochs,
        "response_length": args.response_length, "max_prompt_tokens": args.max_prompt_tokens, "lr": args.lr,
        "kl_coef": args.kl_coef, "seed": args.seed, "threads": args.threads,
    }


def run_side(side: str, python: Path, spec: dict, work: Path, run: int, timeout: float) -> dict:
    spec = {**spec, "output_dir": str(work / f"out-{spec['model']}-{side}-{run}")}
    spec_path = work / f"spec-{spec['model']}-{side}-{run}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ""}
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", side, "--spec", str(spec_path)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"{side} worker failed (rc {proc.returncode}) after {time.time() - t0:.0f}s:\n{tail}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    shutil.rmtree(spec["output_dir"], ignore_errors=True)  # the trained policy is not needed
    phases = result.get("phase_s_per_step")
    split = (f", per step: gen {result['wall_steps_s'] * result['gen_share'] / (result['steps'] - 1):.2f}s "
             f"score {phases['score_rollout']:.2f}s update {phases['ppo_update']:.2f}s" if phases else "")
    print(f"[bench] {spec['model']} {side} run {run}: {result['episodes_per_s']:.3f} episodes/s, "
          f"gen {result.get('gen_tokens_per_s', float('nan')):.1f} tok/s ({result['gen_share']:.0%} of step time), "
          f"mean response {result['response_tokens_mean']:.1f} tokens, score first {result['score_first']:.3f} "
          f"last {result['score_last']:.3f}, {result['total_s']:.0f}s incl. loading{split}", flush=True)
    return result


def summarise(model: str, spec: dict, runs: dict[str, list[dict]]) -> dict:
    def best(side, key):  # throughput: best of the repeats (least disturbed by the shared machine)
        return max(r[key] for r in runs[side])

    def median(side, key):
        return statistics.median(r[key] for r in runs[side])

    ours, trl = best("ours", "episodes_per_s"), best("trl", "episodes_per_s")
    return {
        "model": model, "episodes": spec["steps"] * spec["batch_size"], "timed_episodes":
            (spec["steps"] - 1) * spec["batch_size"], "repeats": len(runs["ours"]),
        "eps_ours": ours, "eps_trl": trl, "ratio": ours / trl,
        "eps_ours_median": median("ours", "episodes_per_s"), "eps_trl_median": median("trl", "episodes_per_s"),
        "gen_tok_s_ours": best("ours", "gen_tokens_per_s"), "gen_tok_s_trl": best("trl", "gen_tokens_per_s"),
        "gen_share_ours": median("ours", "gen_share"), "gen_share_trl": median("trl", "gen_share"),
        "score_first_ours": median("ours", "score_first"), "score_first_trl": median("trl", "score_first"),
        "score_last_ours": median("ours", "score_last"), "score_last_trl": median("trl", "score_last"),
    }


def print_table(rows: list[dict], args) -> None:
    print()
    print(f"PPO throughput, CPU fp32, {args.threads} threads, B={args.batch_size} M={args.mini_batch_size} "
          f"epochs={args.ppo_epochs} R={args.response_length} prompt<={args.max_prompt_tokens} lr={args.lr} "
          f"kl={args.kl_coef}; episodes/s over steps 2..N (best of repeats; median in brackets)")
    head = (f"{'model':<8} {'episodes':>8} {'eps/s ours':>18} {'eps/s TRL':>18} {'ours/TRL':>8} "
            f"{'gen tok/s ours':>14} {'gen tok/s TRL':>13} {'score ours first->last':>23} {'score TRL first->last':>22}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<8} {r['episodes']:>8} {r['eps_ours']:>8.3f} ({r['eps_ours_median']:>7.3f}) "
              f"{r['eps_trl']:>8.3f} ({r['eps_trl_median']:>7.3f}) {r['ratio']:>7.2f}x "
              f"{r['gen_tok_s_ours']:>14.1f} {r['gen_tok_s_trl']:>13.1f} "
              f"{r['score_first_ours']:>+10.3f} -> {r['score_last_ours']:>+8.3f} "
              f"{r['score_first_trl']:>+9.3f} -> {r['score_last_trl']:>+8.3f}")
    print("(score: mean RM score of the rollouts at step 1 -> over the last quarter of the steps; same RM for both)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], default="tiny")
    parser.add_argument("--episodes", type=int, default=None,
                        help="episodes per run (default: 64 for tiny, 32 for smollm2); a multiple of --batch-size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mini-batch-size", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--max-prompt-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--kl-coef", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per side (default 1: on a small shared machine 2+ threads make tiny ops "
                        "wait on descheduled OpenMP threads and the timings meaningless)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved ours/TRL")
    parser.add_argument("--prepared-dir", default=str(ROOT / "data" / "prepared"))
    parser.add_argument("--trl-venv", default=str(DEFAULT_VENV))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker run")
    parser.add_argument("--only", choices=["ours", "trl"], help="run one side only (no table)")
    parser.add_argument("--json", help="also write the summary rows to this file")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args.worker, args.spec)
        return

    if args.batch_size % args.mini_batch_size:
        parser.error("--batch-size must be a multiple of --mini-batch-size")
    models = ["tiny", "smollm2"] if args.model == "both" else [args.model]
    trl_python = ensure_trl_venv(Path(args.trl_venv))
    ours_python = Path(sys.executable)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        work = Path(tmp)
        for model in models:
            episodes = args.episodes or (64 if model == "tiny" else 32)
            if episodes % args.batch_size or episodes // args.batch_size < 2:
                parser.error("--episodes must be a multiple of --batch-size and at least two batches")
            args_m = argparse.Namespace(**{**vars(args), "episodes": episodes})
            spec = prepare_inputs(model, work, args_m)
            runs: dict[str, list[dict]] = {"ours": [], "trl": []}
            for run in range(args.repeats):
                # alternate the order so neither side always runs first on the shared machine
                order = ["ours", "trl"] if run % 2 == 0 else ["trl", "ours"]
                order = [side for side in order if args.only in (None, side)]
                for side in order:
                    python = ours_python if side == "ours" else trl_python
                    runs[side].append(run_side(side, python, spec, work, run, args.timeout))
            if args.only:
                for result in runs[args.only]:
                    print(json.dumps(result))
                continue
            rows.append(summarise(model, spec, runs))
    if rows:
        print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
