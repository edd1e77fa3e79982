"""1 worker against 2 (one thread each) on this machine: SFT tokens/s, reward-model pairs/s and PPO episodes/s on the
tiny model and on SmolLM2-135M, the scaling efficiency, and each worker's memory for parameters plus optimizer state
with FSDP2 against one process.

    .venv/bin/python benchmarks/scaling.py --model tiny            # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/scaling.py --model smollm2         # ~20 min
    .venv/bin/python benchmarks/scaling.py --model both --json out.json

Each figure runs the real stage function (``run_sft``, ``run_reward`` in full mode, ``run_ppo``) in 1 process, and in
2 processes joined by a gloo process group (``torch.multiprocessing``, the way Ray Train starts them, without Ray's
start-up), with the same global batch; the rate is measured from the stage's own per-step metric callbacks, over the
steps after the first (no model loading, no warm-up). Memory is counted, not sampled: the bytes of the parameters and of
the AdamW states a worker holds after one optimizer step (its DTensor shards under FSDP2), for the PPO policy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, job: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = JOBS[job["kind"]](job)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(job: dict, workers: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        job = {**job, "output_dir": str(Path(tmp) / "stage")}
        mp.spawn(_entry, args=(workers, _free_port(), job, out), nprocs=workers, join=True)
        return json.loads(Path(out).read_text())


class _Clock:
    """A metric logger that records when each step's figures arrive."""

    def __init__(self, key: str):
        self.key, self.times = key, []

    def __call__(self, metrics: dict, step: int) -> None:
        if self.key in metrics:
            self.times.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return statistics.median(gaps)


def _config(job: dict, overrides: list[str]):
    from rlhf_pipeline.flows.config import load_config

    return load_config(ROOT / "params.yaml", "smoke", [f"model.base={job['model']}", "model.device=cpu", *overrides])


def _sft_job(job: dict) -> dict:
    from rlhf_pipeline.models.loading import load_tokenizer
    from rlhf_pipeline.tasks.datasets import load_prepared
    from rlhf_pipeline.tasks.sft import run_sft

    batch = 4
    config = _config(job, ["sft.max_examples=24", "sft.epochs=1", f"sft.batch_size={batch}", "sft.eval_examples=4",
                           "sft.checkpoint_every=0", "sft.selection_reward_model=null", "sft.max_length=256"])
    clock = _Clock("sft/loss")
    run_sft(config.sft, config.model, job["prepared"], job["model"], job["output_dir"], clock)
    # tokens a step: the mean length of the demonstrations trained on (as encoded: prompt + response + EOS)
    tokenizer = load_tokenizer(job["model"])
    from rlhf_pipeline.models.tokens import encode_pair

    rows = load_prepared(job["prepared"], "demonstrations", split="train").sample(n=24, random_state=config.model.seed)
    mean_tokens = statistics.mean(len(encode_pair(tokenizer, list(r.prompt), r.response, 256)) for r in rows.itertuples())
    return {"rate": batch * mean_tokens / clock.seconds_per_step(), "unit": "tokens/s"}


def _reward_job(job: dict) -> dict:
    from rlhf_pipeline.tasks.reward import run_reward

    batch = 4
    config = _config(job, ["reward.mode=full", "reward.max_train_pairs=24", f"reward.batch_size={batch}",
                           "reward.judge=false", "reward.normalize=false", "reward.max_eval_pairs=4",
                           "reward.checkpoint_every=0", "reward.max_length=256"])
    clock = _Clock("reward/loss")
    run_reward(config.reward, config.model, job["prepared"], job["model"], job["output_dir"], clock)
    return {"rate": batch / clock.seconds_per_step(), "unit": "pairs/s"}


def _ppo_job(job: dict) -> dict:
    from rlhf_pipeline.tasks.ppo import run_ppo

    batch = 8
    config = _config(job, ["ppo.steps=4", f"ppo.batch_size={batch}", "ppo.mini_batch_size=4", "ppo.ptx_coef=0",
                           "ppo.max_new_tokens=32", "ppo.max_prompt_tokens=64", "ppo.checkpoint_every=0",
                           "ppo.ema_decay=null"])
    clock = _Clock("ppo/score")
    run_ppo(config.ppo, config.model, job["prepared"], job["model"], job["rm"], job["output_dir"], clock)
    return {"rate": batch / clock.seconds_per_step(), "unit": "episodes/s"}


def _memory_job(job: dict) -> dict:
    """Bytes of the policy's parameters and AdamW states this worker holds after one step (its shards under FSDP2)."""
    import torch

    from rlhf_pipeline.models.distributed import Engine
    from rlhf_pipeline.tasks.ppo import PPOConfig, adamw, build_policy

    engine = Engine.create("cpu", "fp32")
    policy = engine.prepare(build_policy(job["model"], PPOConfig(), engine.device))
    optimizer = adamw([p for p in policy.parameters() if p.requires_grad], 1e-5)
    ids = torch.randint(0, 1000, (2, 16))
    policy(input_ids=ids).logits.float().mean().backward()
    optimizer.step()

    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(local(p) for p in policy.parameters())
    states = sum(local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return {"rate": params + states, "unit": "bytes"}


JOBS = {"sft": _sft_job, "reward": _reward_job, "ppo": _ppo_job, "memory": _memory_job}


def _inputs(model: str) -> tuple[str, str, str]:
    """The model folder, the prepared data and a reward model (the policy with a seeded random head)."""
    import torch

    from rlhf_pipeline.models.loading import ensure_smollm2, ensure_tiny_random, load_tokenizer
    from rlhf_pipeline.models.reward_model import ScalarHeadModel

    path = str(ensure_tiny_random() if model == "tiny" else ensure_smollm2())
    prepared = ROOT / "data" / "prepared"
    if not (prepared / "prompts.parquet").exists():
        import subprocess

        subprocess.run([sys.executable, "-m", "rlhf_pipeline.flows.cli", "prepare"], cwd=ROOT, check=True)
    rm = Path(tempfile.gettempdir()) / f"rlhf-bench-rm-{model}"
    if not (rm / "config.json").exists():
        torch.manual_seed(0)
        ScalarHeadModel.from_pretrained(path, torch.device("cpu")).save_pretrained(rm)
        load_tokenizer(path).save_pretrained(rm)
    return path, str(prepared), str(rm)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2", "both"), default="tiny")
    parser.add_argument("--only", nargs="*", choices=tuple(JOBS), default=list(JOBS))
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = []
    for model in (("tiny", "smollm2") if args.model == "both" else (args.model,)):
        path, prepared, rm = _inputs(model)
        for kind in args.only:
            job = {"kind": kind, "model": path, "prepared": prepared, "rm": rm}
            one, two = _run(job, 1), _run(job, 2)
            ratio = two["rate"] / one["rate"]
            rows.append({"model": model, "figure": kind, "unit": one["unit"], "one": one["rate"], "two": two["rate"],
                         "ratio": ratio, "efficiency": ratio / 2 if kind != "memory" else None})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'model':<8} {'figure':<7} {'unit':<11} {'1 worker':>12} {'2 workers':>12} {'2 / 1':>7} {'efficiency':>10}")
    for r in rows:
        efficiency = f"{r['efficiency']:.0%}" if r["efficiency"] is not None else "-"
        scale = 1e6 if r["unit"] == "bytes" else 1.0
        unit = "MB/worker" if r["unit"] == "bytes" else r["unit"]
        print(f"{r['model']:<8} {r['figure']:<7} {unit:<11} {r['one'] / scale:>12.2f} {r['two'] / scale:>12.2f} "
              f"{r['ratio']:>6.2f}x {efficiency:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
