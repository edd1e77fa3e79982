"""Real forward passes on the tiny model: where the reward is read, padding, chat template, PPO's step-0 invariants,
SFT labels."""

import pytest
import torch

from flows.config import PPOConfig
from models.loading import assert_same_tokenizer, load_causal_lm
from models.losses import ppo_policy_loss
from models.policy import response_logprobs, sample_responses
from models.reward_model import ScalarHeadModel, chat_prompt_ids, encode_pair, last_token_index, pad_sequences

CPU = torch.device("cpu")
MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]


@pytest.fixture(scope="module")
def reward_model(tiny_model_path):
    torch.manual_seed(0)
    return ScalarHeadModel.from_pretrained(tiny_model_path, CPU).eval()


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


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


def test_chat_template_has_no_double_bos(tokenizer):
    ids = chat_prompt_ids(tokenizer, MESSAGES)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids[1] != start
    assert ids[-4:] == tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert chat_prompt_ids(tokenizer, MESSAGES, max_tokens=5) == ids[-5:]


def test_ppo_step_zero_policy_equals_reference(tiny_model_path, tokenizer):
    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_path, CPU).eval()
    reference = load_causal_lm(tiny_model_path, CPU).eval()
    queries = [chat_prompt_ids(tokenizer, MESSAGES), chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])]
    rollout = sample_responses(policy, tokenizer, queries, max_new_tokens=6)
    args = (rollout.input_ids, rollout.attention_mask, rollout.query_length)
    with torch.no_grad():
        lp, _ = response_logprobs(policy, *args)
        ref, _ = response_logprobs(reference, *args)
    mask = rollout.response_mask.float()
    kl = ((lp - ref) * mask).sum(1)
    assert kl.abs().max().item() == 0.0
    _, stats = ppo_policy_loss(lp, ref, torch.ones_like(lp), mask)
    assert stats["ratio"].item() == pytest.approx(1.0, abs=1e-7)
    # the response is right-padded after the first EOS and the mask covers it
    assert rollout.response_mask.shape == rollout.responses.shape
    assert (rollout.responses[rollout.response_mask == 0] == tokenizer.pad_token_id).all()


def test_sampled_logprobs_match_generation_distribution(tiny_model_path, tokenizer):
    """Log-probabilities recomputed by a full forward equal those of the cached generation."""
    model = load_causal_lm(tiny_model_path, CPU).eval()
    queries = [chat_prompt_ids(tokenizer, MESSAGES)]
    torch.manual_seed(1)
    rollout = sample_responses(model, tokenizer, queries, max_new_tokens=4)
    with torch.no_grad():
        lp, entropy = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.query_length,
                                        with_entropy=True)
        out = model(rollout.input_ids)
    logp = torch.log_softmax(out.logits[0, rollout.query_length - 1 : -1], -1)
    expected = logp.gather(-1, rollout.responses[0].unsqueeze(-1)).squeeze(-1)
    assert lp[0].tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    assert (entropy > 0).all()


def test_tokenizer_mismatch_is_a_clear_error(tokenizer):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<new-token>"])
    with pytest.raises(ValueError, match="must share a tokenizer"):
        assert_same_tokenizer(tokenizer, other)


def test_sft_batch_labels_learn_eos_and_mask_the_prompt(tiny_model_path, tokenizer, tmp_path):
    """The SFT trainer's batch: the response's EOS is a label, prompt tokens carry no loss (-100)."""
    from datasets import Dataset
    from trl import SFTTrainer

    from flows.config import Config, DataConfig, SFTConfig, SourceConfig
    from tasks.sft import sft_training_args, to_conversations
    import pandas as pd

    frame = pd.DataFrame({"prompt": [MESSAGES], "response": ["Mix flour and water."]})
    config = Config(data=DataConfig(comparisons=[SourceConfig(name="c")], demonstrations=[SourceConfig(name="d")]),
                    sft=SFTConfig(batch_size=1, max_length=128))
    trainer = SFTTrainer(
        model=load_causal_lm(tiny_model_path, CPU),
        args=sft_training_args(config, tmp_path, CPU, has_eval=False),
        train_dataset=Dataset.from_list(to_conversations(frame)),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    prompt_len = len(chat_prompt_ids(tokenizer, MESSAGES))
    assert (labels[:prompt_len] == -100).all()
    learned = labels[labels != -100].tolist()
    assert tokenizer.eos_token_id in learned
    response = tokenizer("Mix flour and water.", add_special_tokens=False)["input_ids"]
    assert learned[: len(response)] == response
    assert ids[:prompt_len].tolist() == chat_prompt_ids(tokenizer, MESSAGES)


def test_sampled_kl_to_reference_is_non_negative(tiny_model_path, tokenizer):
    """With temperature 1 and no top-k/top-p, the mean sampled KL(policy || reference) estimate is >= 0."""
    torch.manual_seed(0)
    reference = load_causal_lm(tiny_model_path, CPU).eval()
    policy = load_causal_lm(tiny_model_path, CPU).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    queries = [chat_prompt_ids(tokenizer, MESSAGES)] * 32
    rollout = sample_responses(policy, tokenizer, queries, max_new_tokens=8, temperature=1.0)
    args = (rollout.input_ids, rollout.attention_mask, rollout.query_length)
    with torch.no_grad():
        lp, _ = response_logprobs(policy, *args)
        ref, _ = response_logprobs(reference, *args)
    kl = ((lp - ref) * rollout.response_mask).sum(1)
    assert kl.mean().item() > 0.0


def test_ema_tracks_weights_by_hand():
    from tasks.ppo import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)  # 0.9 * 1 + 0.1 * 2
    ema.copy_to(model)
    assert model.weight.item() == pytest.approx(1.1)


def test_missing_eos_penalty_replaces_the_score(tiny_model_path, tokenizer):
    from tasks.ppo import score_rollout

    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_path, CPU).eval()
    value = ScalarHeadModel.from_pretrained(tiny_model_path, CPU).eval()
    queries = [chat_prompt_ids(tokenizer, MESSAGES)] * 2
    rollout = sample_responses(policy, tokenizer, queries, max_new_tokens=3)
    assert not rollout.ended.any()  # a random tiny model does not say EOS within 3 tokens
    cfg = PPOConfig(missing_eos_penalty=-5.0, kl_coef=0.0)
    batch = score_rollout(rollout, policy, policy, value, value, cfg)
    assert batch["rewards"][:, -1].tolist() == pytest.approx([-5.0, -5.0])
    assert batch["kl"].abs().max().item() == 0.0


def test_checkpoint_selector_keeps_the_lowest_eval_loss_epoch():
    from tasks.sft import CheckpointSelector

    model = torch.nn.Linear(1, 1, bias=False)
    selector = CheckpointSelector()
    for epoch, (weight, loss) in enumerate([(1.0, 2.0), (2.0, 1.5), (3.0, 1.8)], start=1):
        with torch.no_grad():
            model.weight.fill_(weight)
        selector.consider(model, loss, epoch)
    selector.restore(model)
    assert selector.criterion == "eval_loss"
    assert selector.best_epoch == 2 and model.weight.item() == 2.0


def test_checkpoint_selector_prefers_reward_model_score():
    from tasks.sft import CheckpointSelector

    model = torch.nn.Linear(1, 1, bias=False)
    # the RM prefers larger weights although eval loss gets worse
    selector = CheckpointSelector(reward_model=object(), score_fn=lambda m: m.weight.item())
    for epoch, (weight, loss) in enumerate([(1.0, 1.0), (3.0, 2.0), (2.0, 0.5)], start=1):
        with torch.no_grad():
            model.weight.fill_(weight)
        selector.consider(model, loss, epoch)
    selector.restore(model)
    assert selector.criterion == "mean_rm_score"
    assert selector.best_epoch == 2 and model.weight.item() == 3.0


def test_ppo_ptx_adds_the_pretraining_lm_loss(tiny_model_path, tokenizer):
    """PPO-ptx: each minibatch update also descends gamma * LM loss on a pretraining batch (InstructGPT eq. 2)."""
    from models.losses import gae, lm_loss
    from tasks.ppo import pretraining_batches, ppo_update, score_rollout

    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_path, CPU).eval()
    value = ScalarHeadModel.from_pretrained(tiny_model_path, CPU).eval()
    texts = ["Human: hello there\n\nAssistant: hi, how can I help?"] * 4
    batches = pretraining_batches(texts, tokenizer, 2, 32, torch.Generator().manual_seed(0), CPU)
    ptx_ids, ptx_mask = next(pretraining_batches(texts, tokenizer, 2, 32, torch.Generator().manual_seed(0), CPU))
    with torch.no_grad():
        before = lm_loss(policy(input_ids=ptx_ids, attention_mask=ptx_mask).logits, ptx_ids, ptx_mask).item()
    rollout = sample_responses(policy, tokenizer, [chat_prompt_ids(tokenizer, MESSAGES)] * 2, max_new_tokens=4)
    cfg = PPOConfig(ptx_coef=1.0, mini_batch_size=2, learning_rate=1e-3)
    batch = score_rollout(rollout, policy, policy, value, value, cfg)
    adv, ret = gae(batch["rewards"], batch["values"], batch["mask"])
    opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
    vopt = torch.optim.SGD(value.parameters(), lr=0.0)
    stats = ppo_update(rollout, batch, torch.zeros_like(adv), ret, policy, value, opt, vopt, cfg,
                       torch.Generator().manual_seed(0), batches)
    assert stats["ptx_loss"] == pytest.approx(before, rel=1e-4)  # measured before the step
    with torch.no_grad():
        after = lm_loss(policy(input_ids=ptx_ids, attention_mask=ptx_mask).logits, ptx_ids, ptx_mask).item()
    assert after < before  # with zero advantages only the PTX term moves the policy: towards the text
