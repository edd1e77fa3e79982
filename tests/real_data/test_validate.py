"""The Great Expectations gate on the real data and on small synthetic files (real GX, ephemeral context)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from rlhf_pipeline.tasks.datasets import data_version, frame_from_records, load_prepared
from rlhf_pipeline.tasks.validate import (
    DataConfig,
    SourceConfig,
    ValidationFailed,
    ValidationReport,
    run_validate,
    validate_frames,
)

MALFORMED = [
    (87, "empty_reply"),
    (517, "empty_reply"),
    (926, "empty_reply"),
    (1104, "empty_reply"),
    (1255, "prompt_mismatch"),
    (1689, "prompt_mismatch"),
    (1951, "prompt_mismatch"),
    (1953, "prompt_mismatch"),
]
FEW = {"demonstrations": 1, "comparisons": 1, "prompts": 1}
SECRET = "SECRET-TEXT"  # marks row text that must never appear in a report


def _config(shared_data: Path, **overrides) -> DataConfig:
    return DataConfig(
        comparisons=[SourceConfig(name="hh-rlhf-harmless", format="hh_rlhf", hf_dataset="Anthropic/hh-rlhf",
                                  path=str(shared_data / "hh-rlhf-harmless" / "comparisons.jsonl.gz"))],
        demonstrations=[SourceConfig(name="instruction-seed-tasks", format="seed_tasks",
                                     path=str(shared_data / "instruction-seed-tasks" / "seed_tasks.jsonl"))],
        **overrides,
    )


@pytest.fixture(scope="module")
def prepared(shared_data: Path, tmp_path_factory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("prepared") / "prepared"
    return run_validate(_config(shared_data), prepared_dir=folder), folder


def _hh(prompt: str, chosen: str, rejected: str) -> dict:
    return {"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
            "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {rejected}"}


@pytest.fixture
def synthetic(tmp_path: Path) -> DataConfig:
    rows = [
        _hh(f"{SECRET} question one", "good answer", "bad answer"),        # 1
        _hh(f"{SECRET} question two", "same answer", "same answer"),       # 2 chosen == rejected
        _hh(f"{SECRET} question three", "yes", "no"),                      # 3
        _hh(f"{SECRET} question one", "good answer", "bad answer"),        # 4 duplicate of 1
        _hh(f"{SECRET} question four", "", "something"),                   # 5 empty chosen reply
        _hh(f"{SECRET} question five", "fine", "not fine"),                # 6
    ]
    comparisons = tmp_path / "comparisons.jsonl"
    comparisons.write_text("".join(json.dumps(r) + "\n" for r in rows))
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi!"}) + "\n")
    return DataConfig(comparisons=[SourceConfig(name="synthetic", path=str(comparisons))],
                      demonstrations=[SourceConfig(name="demos", path=str(demos))], min_rows=FEW)


# --------------------------------------------------------------------------------------------------------- real data


def test_real_data_passes_with_the_malformed_rows_dropped(prepared, shared_data):
    result, folder = prepared
    assert [(r["row"], r["rule"]) for r in result["dropped"]] == MALFORMED
    assert {(r["dataset"], r["source"]) for r in result["dropped"]} == {("comparisons", "hh-rlhf-harmless")}
    assert result["counts"] == {"demonstrations": 175, "comparisons": 1992, "prompts": 1990}
    assert result["version"] == data_version(folder) and len(result["version"]) == 12
    assert result["report_path"] == folder / "report.json"
    assert set(result["paths"]) == {"demonstrations", "comparisons", "prompts", "report"}

    validation = result["validation"]
    assert validation["success"] is True
    assert validation["token_counter"].startswith("estimated")
    assert {n: d["success"] for n, d in validation["datasets"].items()} == dict.fromkeys(
        ["demonstrations", "comparisons", "prompts"], True)
    assert validation["datasets"]["comparisons"]["evaluated"] >= 12
    # Over the token budget by the len/4 estimate: kept (the trainers truncate) and reported as warnings.
    warnings = {(w["column"], tuple(w["source_rows"])) for w in validation["datasets"]["comparisons"]["warnings"]}
    assert warnings == {("n_response_tokens", (180, 927, 1459))}

    report = json.loads(result["report_path"].read_text())
    assert [(r["row"], r["rule"]) for r in report["dropped"]] == MALFORMED
    assert report["counts"]["comparisons"]["total"] == 1992
    assert report["data_version"] == result["version"]
    assert load_prepared(folder, "comparisons")["source_row"].isin([87, 1255]).sum() == 0
    assert len(load_prepared(folder, "prompts", split="train")) == report["counts"]["prompts"]["splits"]["train"]


def test_run_validate_is_deterministic(prepared, shared_data):
    result, _ = prepared
    again = run_validate(_config(shared_data))  # no prepared_dir: the version of the same bytes, in memory
    assert again["version"] == result["version"]
    assert again["report_path"] is None and again["paths"] == {}


def test_strict_mode_fails_naming_the_rows(shared_data, tmp_path):
    with pytest.raises(ValidationFailed) as info:
        run_validate(_config(shared_data), prepared_dir=tmp_path / "prepared", strict=True)
    message = str(info.value)
    assert "row 87 " in message and "row 1255 " in message
    assert "empty_reply" in message and "prompt_mismatch" in message
    assert [(r["row"], r["rule"]) for r in info.value.report["dropped"]] == MALFORMED
    assert not (tmp_path / "prepared").exists()  # nothing written when the gate fails
    assert isinstance(info.value, RuntimeError)


def test_fail_policy_and_fraction_limit(shared_data):
    with pytest.raises(ValidationFailed, match="invalid_rows is 'fail'"):
        run_validate(_config(shared_data, invalid_rows="fail"))
    with pytest.raises(ValidationFailed, match=r"comparisons: 0\.40% of rows invalid > data\.max_invalid_fraction"):
        run_validate(_config(shared_data, max_invalid_fraction=0.003))


def test_too_few_rows_fails_the_row_count_expectation(shared_data):
    with pytest.raises(ValidationFailed) as info:
        run_validate(_config(shared_data, min_rows={"demonstrations": 20, "comparisons": 5000, "prompts": 20}))
    message = str(info.value)
    assert "comparisons: ExpectTableRowCountToBeBetween: observed 1992, expected min_value=5000" in message
    failed = info.value.report["validation"]["datasets"]["comparisons"]["failed"]
    assert [(f["expectation"], f["level"]) for f in failed] == [("ExpectTableRowCountToBeBetween", "table")]


# --------------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_bad_rows_fail_the_gate_and_are_named(synthetic):
    with pytest.raises(ValidationFailed) as info:
        run_validate(synthetic)
    dropped = {r["row"]: r["rule"] for r in info.value.report["dropped"]}
    assert dropped == {2: "identical_responses", 4: "ExpectColumnValuesToBeUnique", 5: "empty_reply"}
    message = str(info.value)
    assert "comparisons: 50.00% of rows invalid" in message
    for row in (2, 4, 5):
        assert f"synthetic row {row} " in message
    assert SECRET not in message and SECRET not in json.dumps(info.value.report, default=str)


def test_synthetic_rows_are_dropped_below_the_limit_keeping_the_first_duplicate(synthetic):
    config = synthetic.model_copy(update={"max_invalid_fraction": 0.6})
    result = run_validate(config)
    assert [(r["row"], r["rule"]) for r in result["dropped"]] == [
        (2, "identical_responses"), (5, "empty_reply"), (4, "ExpectColumnValuesToBeUnique")]
    assert result["counts"] == {"demonstrations": 1, "comparisons": 3, "prompts": 3}


def test_token_budget_with_a_tokenizer(synthetic):
    config = synthetic.model_copy(update={"max_response_tokens": 1, "max_invalid_fraction": 0.6})
    with pytest.raises(ValidationFailed) as info:
        run_validate(config, count_tokens=lambda text: len(text.split()))
    assert "ExpectColumnValuesToBeBetween [n_response_tokens]" in str(info.value)
    validation = info.value.report["validation"]
    assert validation["token_counter"] == "count_tokens"
    failed = validation["datasets"]["comparisons"]["failed"]
    assert [(f["expectation"], f["column"], sorted(f["source_rows"])) for f in failed] == [
        ("ExpectColumnValuesToBeBetween", "n_response_tokens", [1, 6])]  # "good answer" and "not fine": 2 words


# ------------------------------------------------------------------------------------------------ GX on canonical rows


def _comparison(i: int, prompt: str, responses: list[str]) -> dict:
    return {"id": f"{i:016x}", "prompt": [{"role": "user", "content": prompt}], "responses": responses,
            "split": "train", "source": "hand", "source_row": i}


def test_gx_catches_identical_empty_and_duplicate_comparisons():
    """Canonical frames that bypass ingestion (e.g. written by another tool): GX itself finds the bad rows."""
    rows = [
        _comparison(1, f"{SECRET} a", ["x", "y"]),
        _comparison(2, f"{SECRET} b", ["same", "same"]),
        _comparison(3, f"{SECRET} c", ["fine", ""]),
        _comparison(4, f"{SECRET} a", ["x", "y"]),
        _comparison(5, f"{SECRET} d", ["p", "q", "p"]),
        _comparison(6, f"{SECRET} e", ["p", "q", "r"]),
    ]
    rows[3]["id"] = rows[0]["id"]
    frame = frame_from_records("comparisons", rows)
    config = DataConfig(comparisons=[], demonstrations=[], min_rows=FEW)
    report = validate_frames({"comparisons": frame}, config)
    assert isinstance(report, ValidationReport) and report.success is False
    failed = {(f["expectation"], tuple(f["column"]) if isinstance(f["column"], list) else f["column"]):
              sorted(f["source_rows"]) for f in report.datasets["comparisons"]["failed"]}
    assert failed == {
        ("ExpectSelectColumnValuesToBeUniqueWithinRecord", ("response_0", "response_1")): [2],
        ("ExpectSelectColumnValuesToBeUniqueWithinRecord", ("response_0", "response_1", "response_2")): [5],
        ("ExpectColumnValueLengthsToBeBetween", "response_1"): [3],
        ("ExpectCompoundColumnsToBeUnique", ("prompt_text", "response_0", "response_1")): [1, 4],
        ("ExpectColumnValuesToBeUnique", "id"): [1, 4],
    }
    text = report.format_failures()
    assert "comparisons: ExpectSelectColumnValuesToBeUniqueWithinRecord [response_0, response_1]: 1 rows: " \
           "hand row 2 (id 0000000000000002)" in text
    assert SECRET not in text and SECRET not in json.dumps(report.to_dict(), default=str)


def test_gx_passes_clean_kwise_rows_and_checks_prompts():
    rows = [_comparison(i, f"prompt {i}", ["a", "b", "c"][: 2 + i % 2]) for i in range(1, 7)]
    frame = frame_from_records("comparisons", rows)
    prompts = pd.DataFrame({"id": ["p1", "p2"], "prompt": [[{"role": "user", "content": "x"}],
                                                           [{"role": "assistant", "content": "y"}]],
                            "split": ["train", "nowhere"], "source": ["hand", "hand"]})
    config = DataConfig(comparisons=[], demonstrations=[], min_rows=FEW)
    report = validate_frames({"comparisons": frame, "prompts": prompts}, config)
    assert report.datasets["comparisons"]["success"] is True
    failed = {f["expectation"] + ":" + f["column"]: f["row_ids"] for f in report.datasets["prompts"]["failed"]}
    assert failed == {"ExpectColumnValuesToBeInSet:split": ["p2"], "ExpectColumnValuesToBeInSet:last_prompt_role": ["p2"]}
