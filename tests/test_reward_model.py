"""Reward model: the Bradley-Terry loss by hand, scoring and padding, a short fit beats chance, loading and export."""

import dataclasses

import pytest
import torch
import transformers
from lightning import Trainer

from lightning_rlhf.data import PreferenceDataModule
from lightning_rlhf.functional import bradley_terry_loss
from lightning_rlhf.models import LoraConfig, TinyModelConfig, packed_classifier_scores, packing
from lightning_rlhf.reward_model import RewardModelConfig, RewardModelModule
from lightning_rlhf.rewards import RewardModelScorer

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def tiny_rm(lora=None, lr=2e-3, **kwargs):
    return RewardModelModule(
        reward_model=RewardModelConfig(tiny=TINY, **kwargs),
        lora=lora or LoraConfig(enabled=False),
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
    )


def trainer(max_steps, **kwargs):
    return Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------- the BT loss
def test_bradley_terry_loss_by_hand():
    # Differences [2, 0]: -log sigmoid(2) = log(1 + e^-2) = 0.126928 and -log sigmoid(0) = log 2 = 0.693147;
    # mean 0.410038. The tie counts as a wrong ranking: accuracy 1/2. Mean margin (2 + 0) / 2 = 1.
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0])
    loss, stats = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(loss, torch.tensor(0.410038))
    torch.testing.assert_close(stats.accuracy, torch.tensor(0.5))
    torch.testing.assert_close(stats.margin, torch.tensor(1.0))
    torch.testing.assert_close(stats.chosen_score, torch.tensor(1.0))
    torch.testing.assert_close(stats.rejected_score, torch.tensor(0.0))
    # d/dr_chosen = -sigmoid(-diff) / B = -[0.119203, 0.5] / 2.
    loss.backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.0596015, -0.25]))


def test_bradley_terry_margin_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # Margin 1 for both pairs: arguments [1, -1]; (log(1 + e^-1) + log(1 + e)) / 2 = log(2 + e + 1/e) / 2 = 0.813262.
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=1.0)[0], torch.tensor(0.813262))
    # Per-pair margins [2, 0]: arguments [0, 0]: log 2 = 0.693147. Accuracy and margin ignore the target margin.
    loss, stats = bradley_terry_loss(chosen, rejected, margin=torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor(0.693147))
    torch.testing.assert_close(stats.margin, torch.tensor(1.0))


def test_bradley_terry_is_exact_for_large_differences():
    # softplus, not log(sigmoid(x)): no log(0) = -inf for a confidently wrong pair.
    loss, _ = bradley_terry_loss(torch.tensor([-100.0, 100.0]), torch.tensor([100.0, -100.0]))
    torch.testing.assert_close(loss, torch.tensor(100.0))  # (200 + 0) / 2


@pytest.mark.parametrize(
    ("chosen", "rejected", "margin", "message"),
    [
        (torch.zeros(2), torch.zeros(3), None, "rejected_scores has shape"),
        (torch.zeros(2, 1), torch.zeros(2, 1), None, "1-D"),
        (torch.zeros(0), torch.zeros(0), None, "at least one pair"),
        (torch.zeros(2), torch.zeros(2), torch.zeros(3), "margin has shape"),
    ],
)
def test_bradley_terry_refuses_bad_shapes(chosen, rejected, margin, message):
    with pytest.raises(ValueError, match=message):
        bradley_terry_loss(chosen, rejected, margin)


# ------------------------------------------------------------------------------------------------------ the module
def test_score_is_independent_of_padding():
    module = tiny_rm()
    module.configure_model()
    tok = module.tokenizer
    batch_rows = [{"prompt": "topic: cat\n", "chosen": "jolly merry cat", "rejected": "bleak cat"}] * 2
    data = PreferenceDataModule(pairs=batch_rows, batch_size=2, tokenizer=tok)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["rejected_mask"][0].sum() < batch["rejected_mask"].shape[1]  # the rejected rows are padded
    n = int(batch["rejected_mask"][0].sum())
    with torch.no_grad():
        _, rejected = module.pair_scores(batch)
        alone = module(batch["rejected_ids"][:1, :n], batch["rejected_mask"][:1, :n])
    torch.testing.assert_close(rejected[:1], alone)
    assert module.model.config.pad_token_id == tok.pad_token_id


PAIRS_OF_DIFFERENT_LENGTHS = [
    {"prompt": "topic: cat\n", "chosen": "a jolly merry cat sat on the mat", "rejected": "bleak cat"},
    {"prompt": "topic: ox\n", "chosen": "sunny ox", "rejected": "ox"},
    {"prompt": "t: owl\n", "chosen": "warm owl", "rejected": "a cold and gloomy old owl in the rain"},
]


def rm_batch(module):
    data = PreferenceDataModule(pairs=PAIRS_OF_DIFFERENT_LENGTHS, batch_size=3, tokenizer=module.tokenizer)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def loss_rows_and_gradients(module, batch):
    """Rows in the scoring forward (2B padded, fewer packed), the scores and the Bradley-Terry loss's gradients."""
    rows = []
    embeddings = packing_decoder(module).get_input_embeddings()  # the decoder's input, however it is called
    handle = embeddings.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    module.zero_grad()
    chosen, rejected = module.pair_scores(batch)
    bradley_terry_loss(chosen, rejected)[0].backward()
    handle.remove()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return rows[-1], torch.cat([chosen, rejected]).detach(), grads  # rows[-1]: after the packing probe's forwards


def packing_decoder(module):
    model = module.model.get_base_model() if module.lora_config.enabled else module.model
    return model.get_decoder()


@pytest.mark.parametrize("architecture", ["llama", "llama-lora", "gpt2"])
def test_packed_scores_and_gradients_equal_the_padded_ones(architecture, tmp_path):
    torch.manual_seed(0)
    config = RewardModelConfig(tiny=TINY)
    if architecture == "gpt2":  # another pooling implementation (GPT2ForSequenceClassification's own forward)
        gpt2 = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=384, num_labels=1)
        transformers.AutoModelForSequenceClassification.from_config(gpt2).save_pretrained(tmp_path)
        config = RewardModelConfig(name_or_path=str(tmp_path), tokenizer="byte")
    lora = LoraConfig(enabled=architecture == "llama-lora")
    module = RewardModelModule(reward_model=config, lora=lora)
    module.configure_model()
    if lora.enabled:  # a trained-looking adapter, so its gradient path is not trivially zero
        with torch.no_grad():
            for name, param in module.model.named_parameters():
                if "lora_B" in name:
                    param.add_(0.05 * torch.randn_like(param))
    batch = rm_batch(module)
    padded_rows, padded_scores, padded_grads = loss_rows_and_gradients(module, batch)
    module.packing = True
    packed_rows, packed_scores, packed_grads = loss_rows_and_gradients(module, batch)
    assert padded_rows == 6
    assert packed_rows == 4  # the longest chosen and rejected rows alone, the four short ones in pairs
    torch.testing.assert_close(packed_scores, padded_scores)
    assert packed_grads.keys() == padded_grads.keys()
    assert len(packed_grads) > 0
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, msg=name)


def test_packing_names_the_field_for_a_model_it_cannot_pack(monkeypatch):
    module = tiny_rm()
    module.packing = True
    module.configure_model()
    batch = rm_batch(module)
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match=r"model\.packing: .*LlamaModel.*Set model\.packing: false"):
        module.pair_scores(batch)
    assert packing_decoder(module) not in packing._verified
    del module.model.score  # a classifier whose head has another name
    with pytest.raises(ValueError, match=r"model\.packing: LlamaForSequenceClassification has no `score` head"):
        packed_classifier_scores(module.model, batch["chosen_ids"], batch["chosen_mask"], "model.packing")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradient_checkpointing_gives_the_same_gradients(packed):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A and score-head initialization in both builds
        config = RewardModelConfig(tiny=TINY, gradient_checkpointing=checkpointing)
        module = RewardModelModule(reward_model=config, lora=LoraConfig(), packing=packed)
        module.configure_model()
        module.train()
        with torch.no_grad():  # a trained-looking adapter
            for name, param in module.model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        assert any(getattr(m, "gradient_checkpointing", False) for m in module.model.modules()) == checkpointing
        grads.append(loss_rows_and_gradients(module, rm_batch(module))[2])
    assert any("lora_A" in name for name in grads[1])
    torch.testing.assert_close(grads[1], grads[0])


def test_attn_implementation_reaches_the_model_and_a_bad_one_names_the_field(tmp_path):
    module = RewardModelModule(reward_model=RewardModelConfig(tiny=TINY, attn_implementation="eager"))
    module.configure_model()
    assert module.model.config._attn_implementation == "eager"
    module.save_pretrained(tmp_path)
    for config in (RewardModelConfig(tiny=TINY), RewardModelConfig(name_or_path=str(tmp_path))):
        bogus = RewardModelModule(reward_model=dataclasses.replace(config, attn_implementation="bogus"))
        with pytest.raises(ValueError, match=r"reward_model\.attn_implementation='bogus' cannot be used"):
            bogus.configure_model()


def test_short_fit_beats_chance_on_an_easy_preference():
    # The synthetic world without label noise: prefer sunny words. An untrained random model ranks the held-out pairs
    # no better than chance (its arbitrary preferences may even be anti-correlated); 60 steps bring it well above.
    torch.manual_seed(0)
    module = tiny_rm(lr=3e-3)
    data = PreferenceDataModule(synthetic=True, num_pairs=1280, label_noise=0.0, val_fraction=0.2, batch_size=32)
    fit = trainer(max_steps=60, val_check_interval=30)
    before = fit.validate(module, data, verbose=False)[0]["val/accuracy"]
    fit.fit(module, data)
    after = fit.callback_metrics["val/accuracy"].item()
    assert before < 0.7
    assert after > 0.85
    assert fit.callback_metrics["val/margin"] > 0


def test_causal_lm_directory_gets_a_scalar_head(tmp_path):
    tokenizer = transformers.ByT5Tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=len(tokenizer)
    )
    lm = transformers.AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module = RewardModelModule(
        reward_model=RewardModelConfig(name_or_path=str(tmp_path)), lora=LoraConfig(enabled=False)
    )
    module.configure_model()
    assert module.model.config.num_labels == 1
    assert module.model.score.out_features == 1
    torch.testing.assert_close(module.model.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert module.model.config.pad_token_id == tokenizer.pad_token_id == 0


def test_classifier_with_several_labels_is_refused(tmp_path):
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=384, num_labels=2
    )
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    transformers.ByT5Tokenizer().save_pretrained(tmp_path)
    module = RewardModelModule(reward_model=RewardModelConfig(name_or_path=str(tmp_path)))
    with pytest.raises(ValueError, match="num_labels=2"):
        module.configure_model()


def test_lora_reward_model_saves_merged_weights_the_scorer_loads(tmp_path):
    module = tiny_rm(lora=LoraConfig(r=4))
    module.configure_model()
    with torch.no_grad():  # a trained-looking adapter and head
        for name, param in module.model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    module.save_pretrained(tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    scorer = RewardModelScorer(str(tmp_path))
    scorer.setup(torch.device("cpu"))
    prompts, responses = ["topic: cat\n", "topic: owl\n"], ["jolly cat", "bleak stale owl"]
    ids = [module.tokenizer(p + r)["input_ids"] for p, r in zip(prompts, responses, strict=True)]
    with torch.no_grad():
        ours = torch.cat([module(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.bool)) for x in ids])
    torch.testing.assert_close(scorer(prompts, responses), ours)
