"""Data versions on a real git + DVC project: a failed prepare never loses the last good version, concurrent prepares
wait for each other, runs read immutable versions, and a fresh checkout reproduces the committed dvc.lock."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from rlhf_pipeline.flows import dvc
from rlhf_pipeline.flows.config import load_config
from rlhf_pipeline.tasks.datasets import data_version
from rlhf_pipeline.tasks.readers import DataError
from rlhf_pipeline.tasks.validate import ValidationFailed
from tests.conftest import PROJECT_ROOT
from tests.integration.test_pipeline_smoke import make_project

pytestmark = pytest.mark.integration


def _write_gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(lines))


def test_a_failed_prepare_keeps_the_last_good_version_and_prepares_wait(tmp_path, shared_data):
    """Issue 11, item 1: two prepares at once both succeed, the second after the first (no "is busy"); DVC no longer
    deletes data/prepared before `rlhf prepare` runs (persist), the new version is built and gated aside and published
    by one rename, so a truncated source fails with one clear error that says the last good version is kept, and the
    version a run reads never changes."""
    lines = gzip.open(shared_data / "hh-rlhf-harmless/comparisons.jsonl.gz", "rt").read().splitlines(keepends=True)
    source = tmp_path / "incoming" / "comparisons.jsonl.gz"
    source.parent.mkdir()
    _write_gz(source, lines[:300])
    project = make_project(tmp_path / "project", shared_data, comparisons=source)
    config = load_config(project / "params.yaml", "smoke")

    # two runs prepare at once: the second waits for the first's lock (no "is busy"), then finds the version made
    results, errors, waited = [], [], []

    def prepare(log):
        try:
            results.append(dvc.prepare_version(project, config, log=log))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=prepare, args=(waited.append,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert len(results) == 2 and results[0] == results[1]
    assert sum("waiting for it to finish" in line for line in waited) == 1  # one waited for the other
    good = results[0]
    version = good.name
    assert data_version(project / "data/prepared") == version and data_version(good) == version
    assert json.loads((good / "report.json").read_text())["counts"]["comparisons"]["total"] == 299
    lock = (project / "dvc.lock").read_text()

    whole = source.read_bytes()  # the file is cut short in transfer
    source.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as info:
        dvc.prepare_version(project, config)
    message = str(info.value)
    assert str(source) in message and "rule unreadable" in message and "truncated" in message
    assert f"the last good data version {version}" in message and "is kept" in message
    assert data_version(project / "data/prepared") == version  # DVC did not delete it, prepare did not replace it
    assert data_version(good) == version and (project / "dvc.lock").read_text() == lock

    # without DVC (a --set data.* run) the same: too many invalid rows fail the gate and keep the last version
    broken = [json.loads(line) for line in lines[:400]]
    for row in broken[:40]:
        row["rejected"] = row["chosen"]
    bad = tmp_path / "incoming" / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in broken))
    other = load_config(project / "params.yaml", "smoke", [f"data.comparisons=[{{name: hh, path: {bad}}}]"])
    with pytest.raises(ValidationFailed) as info:
        dvc.prepare_version(project, other)
    assert f"the last good data version {version}" in str(info.value)
    assert data_version(project / "data/prepared") == version and data_version(good) == version


def test_a_fresh_checkout_reproduces_the_committed_dvc_lock(tmp_path, shared_data):
    """Issue 11, item 4: `dvc repro prepare` in a fresh checkout elsewhere (another path, the shared data beside it)
    leaves the committed dvc.lock as it is: the same data gives the same version on every machine, and lineage tags
    do not read `+dirty` for it."""
    checkout = tmp_path / "somewhere" / "else" / "checkout"
    checkout.mkdir(parents=True)
    (tmp_path / "somewhere" / "else" / "shared").symlink_to(shared_data.parent)
    spec = json.loads(json.dumps(__import__("yaml").safe_load((PROJECT_ROOT / "dvc.yaml").read_text())))
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        shutil.copy(PROJECT_ROOT / name, checkout / name)
    for dep in spec["stages"]["prepare"]["deps"]:
        if not dep.startswith(("..", "data/")):
            (checkout / dep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(PROJECT_ROOT / dep, checkout / dep)
    # the optional human-feedback source is not in git (a user's rankings go there): `rlhf run` creates it empty first
    created = dvc.ensure_optional_sources(load_config(checkout / "params.yaml", "smoke"))
    assert [path.name for path in created] == ["comparisons.jsonl"] and created[0].stat().st_size == 0
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=checkout, check=True)
    proc = subprocess.run(["dvc", "repro", "prepare"], cwd=checkout, env=dvc.dvc_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (checkout / "dvc.lock").read_text() == (PROJECT_ROOT / "dvc.lock").read_text(), \
        "dvc.lock changed: regenerate it (`dvc repro prepare`) and commit it with the change to the prepare stage"
