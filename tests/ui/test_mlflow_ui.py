"""What a user sees in the MLflow UI after a pipeline run: a real smoke run, a real ``mlflow server`` on 127.0.0.1,
headless Chromium (the Debian package, driven by Playwright).

Needs ``/usr/bin/chromium`` (``make browser`` installs it); fails, never skips, when it is missing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# at least these nested runs (the flow may add more)
STAGE_RUNS = ("validate", "sft", "reward", "ppo", "evaluate", "register")
UI_TIMEOUT_MS = 60_000  # the first page load parses MLflow's JS bundle: seconds on a busy 2-core machine


@pytest.fixture(scope="module", autouse=True)
def browser_requirements():
    """Fail (never skip) before the minutes of the pipeline run when the browser cannot start."""
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is missing ({CHROMIUM}): run `make browser` (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("playwright is not installed: `.venv/bin/pip install -e '.[dev]'`")


@pytest.fixture(scope="module")
def pipeline_run(first_smoke_run, tmp_path_factory):
    """The smoke flow's first run (tests/conftest.py: real Prefect, MLflow on SQLite), seen through a copy of its
    MLflow store as that run left it."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("ui")
    uri = first_smoke_run.snapshot_uri
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(first_smoke_run.summary["mlflow_parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    stages = {r.info.run_name: r for r in children}
    assert set(STAGE_RUNS) <= set(stages), sorted(stages)  # the data is there; what follows checks the UI shows it
    return {"root": root, "uri": uri, "parent": parent, "stages": stages, "client": client}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(pipeline_run):
    """``mlflow server`` on 127.0.0.1:<free port> over the run's SQLite store; yields its base URL."""
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = (pipeline_run["root"] / "mlflow-server.log").open("w")
    host = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", pipeline_run["uri"], "--allowed-hosts", f"{host},localhost:{port}",
        ],
        cwd=pipeline_run["root"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: teardown stops uvicorn and its workers with it
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://{host}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{_tail(log.name)}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {url}/health within 120 s:\n{_tail(log.name)}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)
        log.close()


def _tail(path: str, lines: int = 30) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def browser(browser_requirements):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(mlflow_ui, browser, tmp_path_factory):
    """One tab with a fresh browser profile (MLflow's UI starts in its default "GenAI" view) at 1600x1000, shared by
    the tests: after the first page load the SPA moves between hash routes without reloading its bundle. Torn down
    before the server so that no keep-alive connection holds up its shutdown."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, base_url=mlflow_ui)
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    yield page
    page.screenshot(path=tmp_path_factory.getbasetemp() / "mlflow-ui-last.png")
    context.close()


def expect(locator):
    """Playwright's retrying assertions (imported late: a missing playwright fails in ``browser_requirements``)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def _metric_value(page, name: str) -> float:
    """The value a run page's Overview shows in the Metrics table's row ``name``."""
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
    row.scroll_into_view_if_needed()
    return float(row.get_by_role("cell").nth(1).inner_text())


def test_experiment_view_lists_the_flow_run_and_its_stage_runs(page, pipeline_run, tmp_path):
    exp = pipeline_run["parent"].info.experiment_id
    page.goto(f"/#/experiments/{exp}")
    # a fresh profile opens MLflow 3's GenAI view (traces); the training runs are under "Model training"
    page.get_by_text("Model training", exact=True).click()
    parent_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="rlhf-smoke", exact=True))
    parent_row.wait_for()
    stages = pipeline_run["stages"]
    expect(page.get_by_text(f"{1 + len(stages)} matching runs")).to_be_visible()  # the parent and its stage runs
    parent_row.locator("button").first.click()  # the [+] beside the run name expands the nested runs
    for stage in stages:
        page.get_by_role("link", name=stage, exact=True).wait_for()
    page.screenshot(path=tmp_path / "experiment.png")


def test_parent_run_page_shows_the_stage_runs(page, pipeline_run, tmp_path):
    parent = pipeline_run["parent"]
    page.goto(f"/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}")
    page.get_by_role("heading", name="rlhf-smoke", exact=True).wait_for()
    page.get_by_text(parent.info.run_id, exact=True).wait_for()
    expect(page.get_by_text("Finished", exact=True).first).to_be_visible()
    page.get_by_text("Child runs", exact=True).wait_for()
    for stage in pipeline_run["stages"]:
        link = page.get_by_role("link", name=stage, exact=True)
        link.wait_for()
        assert pipeline_run["stages"][stage].info.run_id in link.get_attribute("href")
    expect(page.get_by_text("rlhf.data_version")).to_be_visible()  # the tags the flow sets
    page.screenshot(path=tmp_path / "parent-run.png")


def test_evaluate_run_page_shows_the_win_rate(page, pipeline_run, tmp_path):
    parent, evaluate = pipeline_run["parent"], pipeline_run["stages"]["evaluate"]
    page.goto(f"/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}")
    page.get_by_role("heading", name="rlhf-smoke", exact=True).wait_for()  # not the previous view's links
    page.get_by_role("link", name="evaluate", exact=True).click()  # a user follows the child-run link
    page.get_by_role("heading", name="evaluate", exact=True).wait_for()
    page.get_by_role("link", name="win_rate_vs_sft", exact=True).wait_for()
    assert _metric_value(page, "win_rate_vs_sft") == pytest.approx(evaluate.data.metrics["win_rate_vs_sft"])
    assert _metric_value(page, "kl_to_sft") == pytest.approx(evaluate.data.metrics["kl_to_sft"])
    page.screenshot(path=tmp_path / "evaluate-run.png")
    # the artifacts the stage logged are listed and readable through the server
    page.get_by_role("tab", name="Artifacts").click()
    for artifact in ("report.html", "ppo_curves.png", "samples_table.json"):
        page.get_by_text(artifact, exact=True).wait_for()
    page.get_by_text("ppo_curves.png", exact=True).click()
    page.locator("img[src*='ppo_curves.png'], img[src^='blob:']").first.wait_for()
    page.screenshot(path=tmp_path / "evaluate-artifacts.png")


def test_ppo_run_page_shows_the_kl_curve(page, pipeline_run, tmp_path):
    parent, ppo = pipeline_run["parent"], pipeline_run["stages"]["ppo"]
    kl = pipeline_run["client"].get_metric_history(ppo.info.run_id, "ppo/kl")
    assert len(kl) >= 2, kl  # a step curve: one value per PPO step
    page.goto(f"/#/experiments/{parent.info.experiment_id}/runs/{ppo.info.run_id}")
    page.get_by_role("heading", name="ppo", exact=True).wait_for()
    page.get_by_role("link", name="ppo/kl", exact=True).wait_for()
    last = max(kl, key=lambda m: m.step)
    assert _metric_value(page, "ppo/kl") == pytest.approx(last.value)
    page.get_by_role("tab", name="Model metrics").click()  # one chart per metric of the `ppo/` group, over the steps
    legend = page.get_by_text("ppo (ppo/kl)", exact=True)
    legend.scroll_into_view_if_needed()
    chart = page.get_by_test_id("experiment-view-compare-runs-card").filter(has=legend)
    expect(chart.locator(".scatterlayer .point")).to_have_count(len(kl))  # one point per logged step
    page.screenshot(path=tmp_path / "ppo-metrics.png")
