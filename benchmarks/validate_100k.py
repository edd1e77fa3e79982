"""The data gate at scale: ingest, validate (GX) and write 100,000 valid comparisons, with the model's tokenizer.

    .venv/bin/python benchmarks/validate_100k.py [--rows 100000] [--max-seconds 60] [--max-gb 0.5]

Target (issue 11): 100,000 valid rows in <= 60 s wall and <= 0.5 GB peak resident memory on the 2-core development
machine, the whole gate included: reading the file, parsing, token counts with SmolLM2's tokenizer, both GX passes,
the Parquet files and report.json (`rlhf prepare` does exactly this). The rows are synthetic HH-RLHF transcripts (JSON
lines, gzip) with unique prompts of 1-3 turns and replies of 20-80 words, about the sizes of the real data; 200
demonstrations come with them. The gate runs in a child process so its peak memory (ru_maxrss) is its own. Exits 1
when a target is missed. This is a benchmark, not a test: `make test` does not run it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a to of and in is it you that for on with as this be are not have can what how why when would should "
         "could people think know good bad help make time way thing like just more some about tell want need please "
         "question answer reason example really never always maybe because world money friend house water food").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_rows(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` HH-style comparisons (unique prompts, distinct replies) as gzip JSON lines."""
    rng = random.Random(seed)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i in range(rows):
            turns = []
            for t in range(rng.choice((1, 1, 2, 3))):
                turns.append(f"\n\nHuman: {_sentence(rng, rng.randint(8, 30))} (#{i}.{t})")
                if t < 2:
                    turns.append(f"\n\nAssistant: {_sentence(rng, rng.randint(10, 40))}")
            prompt = "".join(turns[:-1] if turns[-1].startswith("\n\nAssistant") else turns)
            chosen = _sentence(rng, rng.randint(20, 80))
            rejected = _sentence(rng, rng.randint(20, 80)) + " No."
            handle.write(json.dumps({"chosen": f"{prompt}\n\nAssistant: {chosen}",
                                     "rejected": f"{prompt}\n\nAssistant: {rejected}"}) + "\n")


def make_demonstrations(path: Path, rows: int = 200, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"instruction": f"{_sentence(rng, 12)} ({i})", "input": "",
                                     "output": _sentence(rng, 40)}) + "\n")


CHILD = """
import json, resource, sys, time
import great_expectations  # imported up front, as `rlhf prepare` does before the gate reads a row
from rlhf_pipeline.flows.dvc import token_counter
from rlhf_pipeline.flows.config import load_config
from rlhf_pipeline.tasks.validate import DataConfig, SourceConfig, run_validate
config = load_config(sys.argv[1], "smoke")
data = DataConfig(comparisons=[SourceConfig(name="synthetic", path=sys.argv[2], format="auto")],
                  demonstrations=[SourceConfig(name="demos", path=sys.argv[3])])
count = token_counter(config)
def rss_gb():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:")) / 1024 / 1024
before = rss_gb()
usage = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
result = run_validate(data, count_tokens=count, prepared_dir=sys.argv[4])
wall = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
peak = after.ru_maxrss / 1024 / 1024  # KiB -> GiB
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_gb": peak, "libraries_gb": before, "counts": result["counts"],
                  "dropped": len(result["dropped"])}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--max-gb", type=float, default=0.5)
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="rlhf-validate-bench-") as tmp:
        tmp = Path(tmp)
        comparisons, demos = tmp / "comparisons.jsonl.gz", tmp / "demos.jsonl"
        make_rows(comparisons, args.rows)
        make_demonstrations(demos)
        print(f"{args.rows:,} comparisons: {comparisons.stat().st_size / 1e6:.1f} MB gzip", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(root / "params.yaml"), str(comparisons), str(demos),
                               str(tmp / "prepared")], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 2
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        total = time.perf_counter() - start
    data_gb = result["peak_gb"] - result["libraries_gb"]
    ok = result["wall_s"] <= args.max_seconds and data_gb <= args.max_gb
    print(f"gate: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU (target <= {args.max_seconds:.0f} s); "
          f"memory {data_gb:.2f} GB for the data (target <= {args.max_gb:.2f} GB) over {result['libraries_gb']:.2f} GB "
          f"of loaded libraries (torch through the config classes, GX, pandas, the tokenizer): peak RSS "
          f"{result['peak_gb']:.2f} GB; {result['counts']}, {result['dropped']} dropped; {total:.1f} s with the "
          f"interpreter start -> {'OK' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
