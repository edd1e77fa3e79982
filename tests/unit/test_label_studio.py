"""infra/label_studio.py (the server's environment and the refusals before anything starts) and
flows/label_studio.py (the client's token handling); the real server runs in tests/integration/test_feedback_loop.py
and tests/ui/test_label_studio_ui.py."""

from __future__ import annotations

import socket

import pytest

from rlhf_pipeline.flows.label_studio import LABEL_CONFIG, LabelStudio, LabelStudioError, _is_jwt
from rlhf_pipeline.infra import label_studio as ls


def test_the_server_environment_is_local_quiet_and_controlled(monkeypatch):
    monkeypatch.setenv("USERNAME", "someone")  # Label Studio would read these plain names too
    monkeypatch.setenv("PASSWORD", "secret")
    monkeypatch.setenv("PORT", "1234")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0123456789")
    env = ls.base_env()
    assert {k: env[k] for k in ("SENTRY_DSN", "FRONTEND_SENTRY_DSN", "COLLECT_ANALYTICS", "LATEST_VERSION_CHECK",
                                "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK")} == {
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true"}
    assert not {"USERNAME", "PASSWORD", "PORT", "LABEL_STUDIO_API_KEY"} & set(env)
    assert ls.HOST == "127.0.0.1"


def test_the_cache_follows_rlhf_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    assert ls.cache_dir() == tmp_path / f"label-studio-{ls.VERSION}"


def test_start_refuses_a_taken_port_and_a_first_start_without_credentials(monkeypatch, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ls.LabelStudioSetupError, match=f"port {port} on 127.0.0.1 is in use"):
            ls.start(tmp_path / "data", port)
    for name in ("LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ls.LabelStudioSetupError, match="export LABEL_STUDIO_PASSWORD") as caught:
        ls.start(tmp_path / "data", ls.free_port())
    assert "LABEL_STUDIO_API_KEY (6-40 characters" in str(caught.value)
    with pytest.raises(ls.LabelStudioSetupError, match="6-40 characters"):
        ls.start(tmp_path / "data", ls.free_port(), credentials={"password": "pw", "api_key": "short"})
    assert not (tmp_path / "data").exists()  # refused before anything was copied or started
    assert ls.running(tmp_path / "data") is None and ls.stop(tmp_path / "data") is False
    assert ls.main(["status", "--data-dir", str(tmp_path / "data")]) == 1


def test_the_client_needs_a_token_and_tells_jwt_from_legacy(monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(LabelStudioError, match="set LABEL_STUDIO_API_KEY"):
        LabelStudio("http://127.0.0.1:9")
    assert _is_jwt("eyJhbGciOi.eyJ0b2tlbl9.c2lnbmF0dXJl") and not _is_jwt("0123456789abcdef0123")
    client = LabelStudio("http://127.0.0.1:9/", api_key="0123456789abcdef")  # a legacy token: no call at creation
    assert client.url == "http://127.0.0.1:9"
    with pytest.raises(LabelStudioError) as caught:
        client.projects()
    assert "cannot reach Label Studio at http://127.0.0.1:9" in str(caught.value)
    assert "0123456789abcdef" not in str(caught.value)


def test_the_ranking_configuration():
    assert '<List name="responses" value="$responses"' in LABEL_CONFIG
    assert '<Ranker name="rank" toName="responses"/>' in LABEL_CONFIG
