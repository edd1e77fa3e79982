"""The reward stage on the real data with the tiny model: normalisation, judge, head-only mode."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["head", "top_layers", "full"])
def test_reward_stage_normalises_demonstrations_to_zero(mode, prepared_data, tiny_model_path, tmp_path):
    from rlhf_pipeline.flows.config import load_config
    from rlhf_pipeline.models.loading import load_tokenizer
    from rlhf_pipeline.models.reward_model import ScalarHeadModel, score_texts
    from rlhf_pipeline.tasks.datasets import load_prepared
    from rlhf_pipeline.tasks.reward import run_reward

    config = load_config(PROJECT_ROOT / "params.yaml", "smoke", [f"reward.mode={mode}", "reward.max_train_pairs=24"])
    result = run_reward(config.reward, config.model, prepared_data, tiny_model_path, tmp_path)
    m = result.metrics
    assert m["train_pairs"] == 24 and m["eval_pairs"] == 16 and m["judge_train_pairs"] == 16
    assert 0.0 <= m["accuracy"] <= 1.0 and m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]
    if mode == "head":
        assert m["head_l2"] in config.reward.head_l2_candidates
    else:
        assert m["steps"] == 6.0  # 24 pairs in batches of 4, one epoch

    # App. C.2: the saved RM's mean score on the SFT demonstrations is 0, and the bias is stored with the model
    rm = ScalarHeadModel.from_pretrained(result.paths["model"], torch.device("cpu")).eval()
    assert float(rm.bias) == pytest.approx(m["normalization_bias"], abs=1e-5)
    demos = load_prepared(prepared_data, "demonstrations", split="train").head(64)
    scores = score_texts(rm, load_tokenizer(result.paths["model"]), [list(p) for p in demos.prompt],
                         list(demos.response), config.reward.max_length)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-3)
    # the judge is a different model (trained on the validation split) reading other features: the RM averages the
    # response after round(0.67 * 2) = 1 block, the judge reads the last token after max(1, round(0.4 * 2)) = 1
    # block; both are saved so that they load that way, and the judge is normalised too
    judge = ScalarHeadModel.from_pretrained(result.paths["judge"], torch.device("cpu")).eval()
    assert not torch.equal(judge.head.weight, rm.head.weight)
    assert (rm.pooling, len(rm.backbone.layers)) == ("mean", 1)
    assert (judge.pooling, len(judge.backbone.layers)) == ("last", 1)
    judge_scores = score_texts(judge, load_tokenizer(result.paths["judge"]), [list(p) for p in demos.prompt],
                               list(demos.response), config.reward.max_length)
    assert judge_scores.mean().item() == pytest.approx(0.0, abs=1e-3)


def test_head_mode_fits_the_judge_on_the_features_a_deeper_backbone_gives(prepared_data, tiny_model_path, tmp_path):
    """With ``reward.depth=1.0`` the RM keeps both blocks of the tiny model and the judge one: the judge's train rows
    go through a one-block backbone of their own, and its head is the head fitted on the deep backbone's view of
    block 1 (the same features, whichever backbone computes them)."""
    from rlhf_pipeline.flows.config import load_config
    from rlhf_pipeline.models.loading import load_tokenizer
    from rlhf_pipeline.models.reward_model import ScalarHeadModel, score_texts
    from rlhf_pipeline.tasks.datasets import load_prepared
    from rlhf_pipeline.tasks.reward import _fit_head, _flat, _select, run_reward

    config = load_config(PROJECT_ROOT / "params.yaml", "smoke", ["reward.mode=head", "reward.depth=1.0"])
    cfg, seed = config.reward, config.model.seed
    result = run_reward(cfg, config.model, prepared_data, tiny_model_path, tmp_path)
    rm = ScalarHeadModel.from_pretrained(result.paths["model"], torch.device("cpu")).eval()
    judge = ScalarHeadModel.from_pretrained(result.paths["judge"], torch.device("cpu")).eval()
    assert (len(rm.backbone.layers), len(judge.backbone.layers)) == (2, 1)

    deep = ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu"), num_layers=2).eval()
    rows = _select(load_prepared(prepared_data, "comparisons", split=cfg.judge_split), cfg.max_judge_pairs, seed)
    feats = score_texts(deep, load_tokenizer(tiny_model_path), *_flat(rows), cfg.max_length, cfg.batch_size,
                        views=((1, "last"),))[:, 0]
    weight, fit = _fit_head(feats, rows, cfg, seed)
    torch.testing.assert_close(judge.head.weight.view(-1), weight, atol=1e-4, rtol=1e-3)
    assert result.metrics["judge_train_loss"] == pytest.approx(fit["train_loss"], abs=1e-4)
