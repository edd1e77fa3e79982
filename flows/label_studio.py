"""Label Studio's HTTP API, the calls the human-feedback loop makes (plain ``requests``; the SDK drags in pandas,
OpenCV and NLTK for the same calls): find or create the ranking project, import a labeling batch's tasks, export the
annotations.

Authentication: the API token comes from the environment variable ``LABEL_STUDIO_API_KEY`` and only from there (it is
never a flow parameter, never printed, never written). A legacy token is sent as ``Authorization: Token <key>``; a
personal access token (a JWT) is exchanged at ``/api/token/refresh/`` for a 5-minute access token sent as ``Bearer``,
refreshed when it expires. Label Studio 1.23 turns legacy tokens off for new organisations; ``make label-studio``
creates its organisation with them on (see :mod:`rlhf_pipeline.infra.label_studio`).

Label Studio does not validate annotation results and does not deduplicate imports: the importer validates every
ranking (:mod:`rlhf_pipeline.tasks.feedback`) and :func:`push_tasks` imports only the tasks whose ``ext_id`` the
project does not hold yet.
"""

from __future__ import annotations

import os
import re
from typing import Any

API_KEY_ENV = "LABEL_STUDIO_API_KEY"

#: The ranking page: the prompt, the K responses as a list, a Ranker over them (best on top). The response ids are in
#: the page but hidden (LS's own "LLM ranker" template hides them the same way).
LABEL_CONFIG = """<View>
  <Style>.htx-ranker-item p:last-child { display: none }</Style>
  <Header value="Rank the responses: drag the best to the top, the worst to the bottom"/>
  <Text name="prompt" value="$prompt"/>
  <List name="responses" value="$responses" title="Responses"/>
  <Ranker name="rank" toName="responses"/>
</View>"""


class LabelStudioError(RuntimeError):
    """A Label Studio call failed: the message names the call and the server's answer (never the token)."""


def _is_jwt(key: str) -> bool:
    return bool(re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", key))


class LabelStudio:
    """A session with one Label Studio server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8080``.
        api_key: the token; default ``$LABEL_STUDIO_API_KEY``.
        timeout: seconds per request.

    Raises:
        LabelStudioError: when no token is given or set.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        import requests

        self.url = url.rstrip("/")
        key = api_key or os.environ.get(API_KEY_ENV, "")
        if not key:
            raise LabelStudioError(
                f"set {API_KEY_ENV} to your Label Studio API token (Account & Settings → Access Token in the web UI; "
                "`make label-studio` creates the admin with the token in that variable)")
        self._key = key
        self._timeout = timeout
        self._session = requests.Session()
        self._session.headers["Accept"] = "application/json"
        self._authorize()

    def _authorize(self) -> None:
        if not _is_jwt(self._key):
            self._session.headers["Authorization"] = f"Token {self._key}"
            return
        import requests

        try:
            answer = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": self._key}, timeout=self._timeout)
        except requests.RequestException as exc:
            raise LabelStudioError(f"cannot reach Label Studio at {self.url}: {type(exc).__name__}") from None
        if not answer.ok:
            raise LabelStudioError(f"POST /api/token/refresh/: HTTP {answer.status_code}: the personal access token in "
                                   f"{API_KEY_ENV} was refused")
        self._session.headers["Authorization"] = f"Bearer {answer.json()['access']}"

    def request(self, method: str, path: str, **kwargs) -> Any:
        """One API call; returns the decoded JSON (``None`` for an empty answer).

        Raises:
            LabelStudioError: the server is unreachable or answers an error (status and the start of its message).
        """
        import requests

        for attempt in (0, 1):
            try:
                answer = self._session.request(method, f"{self.url}{path}", timeout=self._timeout, **kwargs)
            except requests.RequestException as exc:
                raise LabelStudioError(f"cannot reach Label Studio at {self.url} ({method} {path}): "
                                       f"{type(exc).__name__}") from None
            if answer.status_code == 401 and attempt == 0 and _is_jwt(self._key):
                self._authorize()  # the 5-minute access token expired
                continue
            break
        if answer.status_code == 401:
            raise LabelStudioError(f"{method} {path}: HTTP 401: the token in {API_KEY_ENV} was refused "
                                   f"({answer.text[:200]})")
        if not answer.ok:
            raise LabelStudioError(f"{method} {path}: HTTP {answer.status_code}: {answer.text[:500]}")
        return answer.json() if answer.content else None

    # ------------------------------------------------------------------------------------------------------ projects

    def projects(self) -> list[dict]:
        """Every project the token's user can see."""
        out, page = [], 1
        while True:
            answer = self.request("GET", "/api/projects/", params={"page": page, "page_size": 100})
            if isinstance(answer, list):
                return answer
            out += answer.get("results", [])
            if not answer.get("next"):
                return out
            page += 1

    def project(self, ref: str | int) -> dict | None:
        """A project by id (digits) or by title; ``None`` when there is none."""
        if str(ref).isdigit():
            try:
                return self.request("GET", f"/api/projects/{int(ref)}/")
            except LabelStudioError as exc:
                if "HTTP 404" in str(exc):
                    return None
                raise
        return next((p for p in self.projects() if p.get("title") == ref), None)

    def ensure_project(self, title: str, annotators_per_task: int = 1) -> tuple[dict, bool]:
        """The ranking project ``title``, created with :data:`LABEL_CONFIG` when it does not exist.

        Returns:
            ``(project, created)``.

        Raises:
            LabelStudioError: when a project of that title exists with a labeling configuration that has no
                ``Ranker`` named ``rank`` over a ``List`` of ``$responses`` (its rankings could not be imported).
        """
        found = self.project(title)
        if found is not None:
            config = found.get("label_config") or ""
            if not (re.search(r'<Ranker[^>]*name="rank"', config) and 'value="$responses"' in config):
                raise LabelStudioError(f"Label Studio project {title!r} (id {found['id']}) exists but its labeling "
                                       "configuration has no <Ranker name=\"rank\"> over <List value=\"$responses\">; "
                                       "choose another collect.label_studio_project")
            return found, False
        created = self.request("POST", "/api/projects/", json={
            "title": title,
            "description": "Rank each prompt's responses from best (top) to worst (bottom). Created by `rlhf collect`.",
            "label_config": LABEL_CONFIG,
            "maximum_annotations": annotators_per_task,
            "show_skip_button": True,
            "enable_empty_annotation": False,
        })
        return created, True

    # --------------------------------------------------------------------------------------------------------- tasks

    def export(self, project_id: int) -> list[dict]:
        """Every task of the project with its annotations (``exportType=JSON``, unannotated tasks included)."""
        answer = self.request("GET", f"/api/projects/{project_id}/export",
                              params={"exportType": "JSON", "download_all_tasks": "true"})
        if not isinstance(answer, list):
            raise LabelStudioError(f"GET /api/projects/{project_id}/export: expected a list of tasks")
        return answer

    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        """Import ``tasks``; returns their new ids."""
        answer = self.request("POST", f"/api/projects/{project_id}/import", params={"return_task_ids": "true"},
                              json=tasks)
        return list(answer.get("task_ids") or [])


def push_tasks(client: LabelStudio, title: str, tasks: list[dict], annotators_per_task: int = 1) -> dict:
    """Put a labeling batch's tasks into the ranking project ``title`` (created when missing), skipping the tasks whose
    ``ext_id`` the project holds already (so pushing a batch twice imports it once).

    Returns:
        ``{"project_id", "project_created", "imported", "already_there", "task_ids" (ext_id -> Label Studio id),
        "url" (the project's data page)}``.
    """
    project, created = client.ensure_project(title, annotators_per_task)
    existing = {}
    if not created:
        for task in client.export(project["id"]):
            ext = (task.get("data") or {}).get("ext_id")
            if ext is not None:
                existing.setdefault(str(ext), task.get("id"))
    new = [t for t in tasks if t["data"]["ext_id"] not in existing]
    ids = client.import_tasks(project["id"], new) if new else []
    mapping = {**existing, **{t["data"]["ext_id"]: i for t, i in zip(new, ids)}}
    return {"project_id": project["id"], "project_created": created, "imported": len(new),
            "already_there": len(tasks) - len(new),
            "task_ids": {t["data"]["ext_id"]: mapping.get(t["data"]["ext_id"]) for t in tasks},
            "url": f"{client.url}/projects/{project['id']}/data"}
