"""The HTML report (tasks/report.py): it opens with the evaluation's headline sentence and plots the raw and
length-controlled win rates."""

from __future__ import annotations

import html
import re

from rlhf_pipeline.tasks.report import write_html_report

HEADLINE = ("PPO's win under the training RM (0.81 [0.73, 0.87]) comes from length, not quality: 42.0% of its responses "
            "end with an end token, mean length 47.8 tokens vs 21.3 for SFT, length-controlled win rate 0.48 "
            "[0.40, 0.57] <&>.")


def evaluation() -> dict:
    return {"win_rate_vs_sft": 0.81, "win_rate_vs_sft_ci": [0.73, 0.87],
            "win_rate_vs_sft_length_controlled": 0.48, "win_rate_vs_sft_length_controlled_ci": [0.40, 0.57],
            "ended_with_eos_policy": 0.42, "length_hack": 1.0, "headline": HEADLINE}


def test_the_report_opens_with_the_headline(tmp_path):
    samples = [{"prompt": "hi", "sft_response": "hello", "sft_reward": 0.1, "policy_response": "hello there",
                "policy_reward": 0.9}]
    path = write_html_report(tmp_path / "report.html", {"reward": {"accuracy": 0.6}, "evaluate": evaluation()}, [],
                             samples)
    text = path.read_text()
    body = text.split("<body>", 1)[1]
    escaped = html.escape(HEADLINE)
    assert "&lt;&amp;&gt;" in escaped
    # the title, then the headline paragraph, before any figure
    assert re.match(r"\s*<h1>RLHF evaluation report</h1>\s*<p class='headline'>", body)
    assert body.index(escaped) < body.index("<h2>Figures</h2>")
    assert "<&>" not in text
    assert "<h2>Win rates</h2>" in text and "win_rate_vs_sft_length_controlled" in text


def test_no_headline_no_paragraph(tmp_path):
    text = write_html_report(tmp_path / "report.html", {"reward": {"accuracy": 0.6}}, [], []).read_text()
    assert "class='headline'" not in text and "<h2>Win rates</h2>" not in text
