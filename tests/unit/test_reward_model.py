"""The reward model (models/reward_model.py): the score is read at the last real token, under any padding; save and load
keep the head and the bias."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.models.reward_model import ScalarHeadModel
from rlhf_pipeline.models.tokens import chat_prompt_ids, encode_pair, pad_sequences

CPU = torch.device("cpu")


MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]


@pytest.fixture(scope="module")
def reward_model(tiny_model_path):
    torch.manual_seed(0)
    return ScalarHeadModel.from_pretrained(tiny_model_path, CPU).eval()


def test_reward_differs_when_only_the_last_token_differs(reward_model, tokenizer):
    prompt = chat_prompt_ids(tokenizer, MESSAGES)
    a = prompt + tokenizer("Mix flour", add_special_tokens=False)["input_ids"]
    b = a[:-1] + [tokenizer.eos_token_id]  # pad == EOS: the EOS must still be read
    ids, mask = pad_sequences([a, b], tokenizer.pad_token_id, side="right")
    with torch.no_grad():
        scores = reward_model.score(ids, mask)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert scores[0].item() != pytest.approx(scores[1].item(), abs=1e-6)


def test_reward_same_under_left_and_right_padding(reward_model, tokenizer):
    short = encode_pair(tokenizer, MESSAGES, "Knead it.", 128)
    long = encode_pair(tokenizer, MESSAGES, "Mix flour, water, salt and yeast, then knead for ten minutes.", 128)
    with torch.no_grad():
        right = reward_model.score(*pad_sequences([short, long], tokenizer.pad_token_id, "right"))
        left = reward_model.score(*pad_sequences([short, long], tokenizer.pad_token_id, "left"))
        alone = reward_model.score(*pad_sequences([short], tokenizer.pad_token_id, "right"))
    assert right.tolist() == pytest.approx(left.tolist(), abs=1e-4)
    assert right[0].item() == pytest.approx(alone[0].item(), abs=1e-4)


def test_reward_model_round_trip_keeps_head_and_bias(reward_model, tokenizer, tmp_path):
    ids, mask = pad_sequences([encode_pair(tokenizer, MESSAGES, "Knead it.", 64)], tokenizer.pad_token_id)
    reward_model.bias.fill_(0.75)
    with torch.no_grad():
        before = reward_model.score(ids, mask).item()
    reward_model.save_pretrained(tmp_path)
    reward_model.bias.fill_(0.0)
    loaded = ScalarHeadModel.from_pretrained(tmp_path, CPU).eval()
    with torch.no_grad():
        assert loaded.score(ids, mask).item() == pytest.approx(before, abs=1e-5)
    assert float(loaded.bias) == pytest.approx(0.75)


def test_mean_pooling_and_fewer_blocks_are_saved_and_restored(tiny_model_path, tmp_path):
    """A reward model can read other features than the paper's: the first block's hidden states averaged over the
    response's tokens (not the prompt's, not padding), and the folder loads back with its pooling and depth."""
    torch.manual_seed(0)
    model = ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu"), num_layers=1, pooling="mean").eval()
    assert len(model.backbone.layers) == 1 and model.pooling == "mean"
    ids = torch.tensor([[5, 6, 7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    response = torch.tensor([[0, 0, 1, 1, 0, 0]])  # a 2-token prompt, a 2-token response, 2 pads
    with torch.no_grad():
        hidden = model.hidden_states(ids, mask)
        features = model.features(ids, mask, response)
        assert torch.allclose(features, hidden[:, 2:4].mean(1), atol=1e-6)
        assert torch.allclose(features, model.features(ids[:, :4], mask[:, :4], response[:, :4]), atol=1e-5)
        with pytest.raises(ValueError, match="pass response_mask"):
            model.score(ids, mask)
        score = model.score(ids, mask, response)
    model.save_pretrained(tmp_path / "judge")
    loaded = ScalarHeadModel.from_pretrained(tmp_path / "judge", torch.device("cpu")).eval()
    assert loaded.pooling == "mean" and len(loaded.backbone.layers) == 1
    with torch.no_grad():
        assert torch.allclose(loaded.score(ids, mask, response), score, atol=1e-6)
    with pytest.raises(ValueError, match="between 1 and the 2 blocks"):
        ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu"), num_layers=3)
    with pytest.raises(ValueError, match="unknown pooling"):
        ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu"), pooling="max")


def test_views_of_one_pass_equal_the_cut_models(tiny_model_path):
    """The head mode reads the RM's and the judge's features from one forward pass: the view (1 block, mean) of the
    2-block model is what a model cut to 1 block with mean pooling reads, and (2, last) is the full model's own."""
    from rlhf_pipeline.models.reward_model import ScalarHeadModel

    full = ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu")).eval()
    cut = ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu"), num_layers=1, pooling="mean").eval()
    ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    response = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 1, 1]])
    with torch.no_grad():
        views = full(ids, mask, "views", ((1, "mean"), (2, "last")), response)
        assert views.shape == (2, 2, full.head.in_features)
        assert torch.allclose(views[:, 0], cut.features(ids, mask, response), atol=1e-5)
        assert torch.allclose(views[:, 1], full.features(ids, mask), atol=1e-6)
        with pytest.raises(ValueError, match="need 1..2 blocks"):
            full(ids, mask, "views", ((3, "last"),))


def test_kept_layers_rounds_the_share_of_blocks_and_keeps_one():
    from rlhf_pipeline.tasks.reward import kept_layers

    assert [kept_layers(30, d) for d in (0.67, 0.4, 0.5, 1.0, 0.01)] == [20, 12, 15, 30, 1]
    assert [kept_layers(2, d) for d in (0.67, 0.4, 1.0)] == [1, 1, 2]


def test_score_texts_reports_progress_per_batch_and_keeps_the_input_order(tiny_model_path):
    """One call over the whole set: batches sorted by length over all of it, ``advance`` told each batch's size, and
    the scores in input order (each equal to the pair scored alone)."""
    import torch

    from rlhf_pipeline.models.loading import load_tokenizer
    from rlhf_pipeline.models.reward_model import ScalarHeadModel, score_texts

    torch.manual_seed(0)
    rm = ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu")).eval()
    tokenizer = load_tokenizer(tiny_model_path)
    prompts = [[{"role": "user", "content": "hi " * n}] for n in (9, 1, 5, 3, 7)]
    responses = ["a b c " * n for n in (1, 6, 2, 4, 3)]
    told: list[int] = []
    scores = score_texts(rm, tokenizer, prompts, responses, 128, batch_size=2, advance=told.append)
    assert told == [2, 2, 1]
    alone = torch.cat([score_texts(rm, tokenizer, [p], [r], 128) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-4)
