"""The ranking page as a labeler uses it: a labeling batch from the tiny model in a real Label Studio (session fixture
``label_studio``), headless Chromium (the Debian package, driven by Playwright): log in, open a task, drag the last
response above the first, submit; the export comes back through ``rlhf import-rankings --export`` with exactly that
ranking, best first.

Needs ``/usr/bin/chromium`` (``make browser``); fails, never skips, when it is missing. The README's picture of this
page, ``tests/ui/label-studio-ranking.png``, was taken the same way with SmolLM2-135M-Instruct's samples (the tiny
model's are random tokens).
"""

from __future__ import annotations

import json

import pytest
import requests
from typer.testing import CliRunner

from rlhf_pipeline.flows.cli import app
from tests.conftest import PROJECT_ROOT
from tests.ui.test_mlflow_ui import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.integration, pytest.mark.labelstudio]

ITEMS = '[data-rbd-droppable-id="rank"] [data-ranker-id]'  # the Ranker's droppable id is its name
PROMPTS = [{"prompt": "Suggest a name for a grey cat."}, {"instruction": "Give one tip for sleeping well.",
                                                          "input": "", "output": "Keep a regular bedtime."}]


@pytest.fixture(scope="module", autouse=True)
def browser_requirements():
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is missing ({CHROMIUM}): run `make browser` (apt-get install -y chromium)")


def _order(page) -> list[str]:
    return page.eval_on_selector_all(ITEMS, "els => els.map(e => e.getAttribute('data-ranker-id'))")


def drag(page, source: str, target: str) -> None:
    """Drag the item ``source`` onto the place of ``target`` with the mouse, in small steps (react-beautiful-dnd needs
    a few pixels of movement before it starts a drag, and an animation after the drop), and wait (up to 10 s) for the
    list's order to change. A drag the page did not pick up (on a loaded machine the first moves can come before the
    list listens) is made once more; a list that never reorders fails the caller's order check."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    before = _order(page)
    for _ in range(2):
        src = page.locator(f'[data-ranker-id="{source}"]').bounding_box()
        dst = page.locator(f'[data-ranker-id="{target}"]').bounding_box()
        page.mouse.move(src["x"] + src["width"] / 2, src["y"] + 15)
        page.mouse.down()
        page.mouse.move(src["x"] + src["width"] / 2, src["y"] + 5, steps=5)
        page.mouse.move(dst["x"] + dst["width"] / 2, dst["y"] + 5, steps=25)
        page.wait_for_timeout(300)
        page.mouse.up()
        try:
            page.wait_for_function(
                "([selector, before]) => JSON.stringify([...document.querySelectorAll(selector)]"
                ".map(e => e.getAttribute('data-ranker-id'))) !== JSON.stringify(before)",
                arg=[ITEMS, before], timeout=10_000)
        except PlaywrightTimeout:
            continue
        page.wait_for_timeout(700)  # the drop animation
        return


def test_drag_a_response_submit_and_import(tmp_path, monkeypatch, tiny_model_path, label_studio):
    from playwright.sync_api import sync_playwright

    from rlhf_pipeline.flows.collect import collect_batch, load_prompts, policy_reference
    from rlhf_pipeline.flows.config import load_config
    from rlhf_pipeline.flows.label_studio import LabelStudio, push_tasks
    from rlhf_pipeline.tasks.collect import label_studio_tasks

    # a batch of two tasks from the tiny model (the plain functions of the rlhf-collect flow), in its own project
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    (project / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = load_config(project / "params.yaml", "smoke", ["collect.label_studio_project=rlhf-ranking-ui"])
    prompts, origin = load_prompts(config, project, "prompts.jsonl")
    policy = policy_reference(config, str(tiny_model_path), project)
    path, _ = collect_batch(config, project, prompts, origin, policy)
    batch = json.loads(path.read_text())
    assert len(batch["tasks"]) == 2
    pushed = push_tasks(LabelStudio(label_studio.url, label_studio.api_key), "rlhf-ranking-ui",
                        label_studio_tasks(batch), 1)
    task = batch["tasks"][0]
    ls_task = pushed["task_ids"][task["task_id"]]
    base = label_studio.url

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})  # the whole list in view: a drag needs both ends
            page.set_default_timeout(60_000)
            page.goto(f"{base}/user/login/")
            page.fill("#email", label_studio.username)
            page.fill("#password", label_studio.password)
            with page.expect_navigation():
                page.click("button.login-button")
            page.goto(f"{base}/projects/{pushed['project_id']}/data?task={ls_task}")
            page.wait_for_selector(ITEMS)
            before = _order(page)
            assert before == task["display_order"]  # the page shows the task's own shuffled order
            drag(page, before[-1], before[0])
            after = _order(page)
            assert after == [before[-1], *before[:-1]], (before, after)
            page.screenshot(path=str(tmp_path / "ranking.png"))
            with page.expect_response(lambda r: r.request.method == "POST"
                                      and f"/api/tasks/{ls_task}/annotations" in r.url) as answer:
                page.click('button[aria-label="Submit current annotation"]')
            assert answer.value.status == 201
        finally:
            browser.close()

    # the export, as a user downloads it, through import-rankings
    export = requests.get(f"{base}/api/projects/{pushed['project_id']}/export", timeout=60,
                          params={"exportType": "JSON", "download_all_tasks": "true"},
                          headers={"Authorization": f"Token {label_studio.api_key}"})
    export.raise_for_status()
    (tmp_path / "export.json").write_bytes(export.content)
    result = CliRunner().invoke(app, ["import-rankings", "--export", str(tmp_path / "export.json"),
                                      "--config", str(project / "params.yaml"), "--profile", "smoke"])
    assert result.exit_code == 0, result.output
    assert "1 new ranked comparisons" in result.output
    (row,) = [json.loads(line) for line in (project / "data/feedback/comparisons.jsonl").read_text().splitlines()]
    texts = {r["id"]: r["text"] for r in task["responses"]}
    assert row["task_id"] == task["task_id"] and row["response_ids"] == after
    assert row["responses"] == [texts[rid] for rid in after]
    assert row["prompt"] == [{"role": "user", "content": "Suggest a name for a grey cat."}]
