"""Tests of lightning_rlhf.models: tiny and saved models, LoRA and full fine-tuning, the reference, pickling."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import transformers
from helpers import TINY

from lightning_rlhf.models import (
    LoraConfig,
    PolicyConfig,
    PolicyValueModel,
    TinyModelConfig,
    adapter_disabled,
    build_policy,
    load_tokenizer,
)

VALUE_HEAD = {"value_head.weight", "value_head.bias"}


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Two left-padded rows: (input_ids, attention_mask), each (2, 9)."""
    enc = tokenizer(["the quick", "a"], add_special_tokens=False, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask.bool()


def build(tokenizer, lora: LoraConfig | None = None, seed: int = 0, **policy) -> PolicyValueModel:
    torch.manual_seed(seed)
    return build_policy(PolicyConfig(tiny=TINY, **policy), lora or LoraConfig(), tokenizer)


def set_lora_b(model: PolicyValueModel, std: float = 0.5) -> None:
    """Give every LoRA B a nonzero value, so the policy differs from the reference."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def hf_logits(causal_lm, input_ids, attention_mask):
    """The HF model's own forward, with the left-padding position ids PolicyValueModel uses."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return causal_lm(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids).logits


def trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_byte_tokenizer_pads_left_with_pad_zero(tokenizer):
    assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id) == (384, 0, 1)
    assert tokenizer.padding_side == "left"


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    transformers.ByT5Tokenizer().save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"pad_token": None}))
    assert load_tokenizer(PolicyConfig(tokenizer=str(tmp_path))).pad_token_id == 1  # ByT5's EOS

    config_file.write_text(json.dumps(config | {"pad_token": None, "eos_token": None}))
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        load_tokenizer(PolicyConfig(tokenizer=str(tmp_path)))


def test_tiny_lora_policy_trains_only_adapter_and_value_head(tokenizer):
    model = build(tokenizer)
    assert model.uses_lora
    assert model.ref_lm is None
    assert model.lm.get_base_model().config.vocab_size == len(tokenizer)
    names = trainable(model)
    lora_names = {name for name, _ in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    # 2 layers x 7 linear layers (q, k, v, o, gate, up, down) x (A, B)
    assert len(lora_names) == 28
    assert names == lora_names | VALUE_HEAD
    assert model.value_head.weight.dtype == torch.float32
    assert model.lm.generation_config.top_k is None  # the checkpoint's sampling defaults are dropped


def test_modules_to_save_trains_lm_head_but_reference_keeps_the_original(tokenizer, batch):
    model = build(tokenizer, LoraConfig(modules_to_save=["lm_head"]))
    lm_head_names = {name for name in trainable(model) if "lm_head" in name}
    assert lm_head_names == {"lm.base_model.model.lm_head.modules_to_save.default.weight"}
    ref_before = model(*batch, mode="ref")
    with torch.no_grad():
        model.lm.get_base_model().lm_head.modules_to_save["default"].weight.mul_(2.0)
    assert torch.equal(model(*batch, mode="ref"), ref_before)
    assert not torch.allclose(model(*batch)[0], ref_before)


def test_full_finetuning_has_frozen_eval_mode_reference(tokenizer, batch):
    model = build(tokenizer, LoraConfig(enabled=False))
    assert not model.uses_lora
    assert trainable(model) == {f"lm.{n}" for n, _ in model.lm.named_parameters()} | VALUE_HEAD
    assert not any(param.requires_grad for param in model.ref_lm.parameters())
    model.train()
    assert model.lm.training
    assert not model.ref_lm.training
    assert torch.equal(model(*batch, mode="ref"), model(*batch)[0])
    with torch.no_grad():
        model.lm.get_output_embeddings().weight.add_(1.0)
    assert not torch.allclose(model(*batch, mode="ref"), model(*batch)[0])


def test_reference_logits_equal_the_base_model_exactly(tokenizer, batch):
    policy = build(tokenizer, seed=3)
    set_lora_b(policy)
    base = build(tokenizer, LoraConfig(enabled=False), seed=3)  # same seed: same base weights, no adapter
    ref_logits = policy(*batch, mode="ref")
    assert torch.equal(ref_logits, base(*batch)[0])
    assert torch.equal(ref_logits, hf_logits(base.lm, *batch))
    assert (policy(*batch)[0] - ref_logits).abs().max() > 1e-2
    assert torch.equal(policy(*batch, mode="ref"), ref_logits)  # the adapter is active again after the reference


def test_adapter_disabled_runs_the_base_model_and_restores_the_adapter_as_peft_does(tokenizer, batch):
    model = build(tokenizer)
    set_lora_b(model)
    causal_lm = model.lm.get_base_model()
    with model.lm.disable_adapter():
        expected = hf_logits(causal_lm, *batch)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with adapter_disabled(model.lm):
        torch.testing.assert_close(hf_logits(causal_lm, *batch), expected)
        with adapter_disabled(model.lm):  # nested: the inner exit must not switch the adapter back on
            pass
        torch.testing.assert_close(hf_logits(causal_lm, *batch), expected)
    assert (hf_logits(causal_lm, *batch) - expected).abs().max() > 1e-2  # the adapter is back
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_logits_slice_selects_positions_and_values_are_float32(tokenizer, batch):
    model = build(tokenizer)
    logits, values = model(*batch)
    sliced_logits, sliced_values = model(batch[0], batch[1].long(), logits_slice=(3, 7))
    assert logits.shape == (2, 9, len(tokenizer))
    assert values.shape == (2, 9)
    assert sliced_logits.shape == (2, 4, len(tokenizer))
    assert sliced_values.dtype == torch.float32
    torch.testing.assert_close(sliced_logits, logits[:, 3:7])
    torch.testing.assert_close(sliced_values, values[:, 3:7])


@pytest.mark.parametrize("mode", ["policy", "ref"])
def test_logits_mask_computes_logits_only_at_the_chosen_positions(tokenizer, batch, mode):
    model = build(tokenizer)
    full = model(*batch, mode=mode, logits_slice=(3, 7))
    chosen = torch.tensor([[True, False, True, True], [False, False, False, True]])
    heads = []
    model.lm.get_base_model().get_output_embeddings().register_forward_pre_hook(lambda m, a: heads.append(a[0].shape))
    masked = model(*batch, mode=mode, logits_slice=(3, 7), logits_mask=chosen)
    full_logits, masked_logits = (full[0], masked[0]) if mode == "policy" else (full, masked)
    assert heads == [(4, 32)]  # lm_head ran on the 4 chosen positions only
    torch.testing.assert_close(masked_logits, full_logits[chosen])
    if mode == "policy":  # the values stay (B, S): the value head is cheap and reads every position
        torch.testing.assert_close(masked[1], full[1])


def test_value_head_starts_near_zero(tokenizer, batch):
    model = build(tokenizer)
    # weight std 0.1 / sqrt(32) on a unit-RMS hidden state: values ~ N(0, 0.1^2), bias 0
    assert torch.equal(model.value_head.bias, torch.zeros(1))
    _, values = model(*batch)
    assert 0 < values.abs().max() < 0.5


def test_bfloat16_policy_keeps_a_float32_value_head(tokenizer, batch):
    model = build(tokenizer, dtype="bfloat16")
    logits, values = model(*batch)
    assert logits.dtype == torch.bfloat16
    assert values.dtype == torch.float32


def test_from_pretrained_directory_reproduces_the_saved_model(tokenizer, batch, tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tokenizer)
    )
    saved = transformers.LlamaForCausalLM(config).eval()
    saved.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    cfg = PolicyConfig(name_or_path=str(tmp_path))
    loaded_tokenizer = load_tokenizer(cfg)
    model = build_policy(cfg, LoraConfig(), loaded_tokenizer)
    assert len(loaded_tokenizer) == len(tokenizer)
    assert loaded_tokenizer.padding_side == "left"
    expected = hf_logits(saved, *batch)
    assert torch.equal(model(*batch, mode="ref"), expected)
    assert torch.equal(model(*batch)[0], expected)  # a fresh adapter (B = 0) changes nothing


def test_attn_implementation_reaches_the_model_from_config_and_from_a_directory(tokenizer, batch, tmp_path):
    sdpa = build(tokenizer)
    eager = build(tokenizer, attn_implementation="eager")
    assert (sdpa.lm.config._attn_implementation, eager.lm.config._attn_implementation) == ("sdpa", "eager")
    real = batch[1].bool()  # padding positions attend to nothing; kernels fill them differently
    torch.testing.assert_close(eager(*batch)[0][real], sdpa(*batch)[0][real])  # another kernel, the same attention
    sdpa.lm.get_base_model().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = PolicyConfig(name_or_path=str(tmp_path), attn_implementation="eager")
    loaded = build_policy(cfg, LoraConfig(), tokenizer)
    assert loaded.lm.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    ("attn_implementation", "match"), [("bogus", "is not supported"), ("flash_attention_2", "FlashAttention2")]
)
def test_unusable_attn_implementation_names_the_field(tokenizer, attn_implementation, match):
    if attn_implementation == "flash_attention_2" and transformers.utils.is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match=rf"policy\.attn_implementation='{attn_implementation}' .*{match}"):
        build(tokenizer, attn_implementation=attn_implementation)


def test_left_padding_does_not_shift_absolute_positions(tokenizer, batch, tmp_path):
    # GPT-2 has learned absolute positions: without position ids counted from the first real token, a left-padded
    # row would see positions 8.. instead of 0.. (Llama's rotary embedding hides that mistake).
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tokenizer), n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    cfg = PolicyConfig(name_or_path=str(tmp_path), tokenizer="byte")
    model = build_policy(cfg, LoraConfig(enabled=False), tokenizer)
    input_ids, attention_mask = batch
    logits, values = model(input_ids, attention_mask)
    alone_logits, alone_values = model(input_ids[1:, -1:], attention_mask[1:, -1:])  # row 1 has one real token
    torch.testing.assert_close(logits[1:, -1:], alone_logits)
    torch.testing.assert_close(values[1:, -1:], alone_values)


def test_missing_local_path_names_the_option(tokenizer, tmp_path):
    missing = PolicyConfig(name_or_path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"policy\.name_or_path"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=r"policy\.name_or_path"):
        build_policy(missing, LoraConfig(), tokenizer)
    with pytest.raises(FileNotFoundError, match=r"policy\.tokenizer"):
        load_tokenizer(PolicyConfig(tokenizer=str(tmp_path / "missing")))


@pytest.mark.parametrize(
    ("policy", "lora", "match"),
    [
        ({"dtype": "fp32"}, {}, r"policy\.dtype"),
        ({}, {"target_modules": ["no_such_proj"]}, r"lora\.target_modules"),
    ],
)
def test_invalid_options_raise_naming_the_option(tokenizer, policy, lora, match):
    with pytest.raises(ValueError, match=match):
        build(tokenizer, LoraConfig(**lora), **policy)


def test_softcapped_logits_match_and_unknown_logit_transforms_are_refused(tokenizer, batch, tmp_path):
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    shape |= {"num_key_value_heads": 4, "head_dim": 8, "vocab_size": len(tokenizer)}
    torch.manual_seed(0)
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**shape, final_logit_softcapping=0.5)).eval()
    gemma.save_pretrained(tmp_path / "gemma2")
    model = build_policy(PolicyConfig(name_or_path=str(tmp_path / "gemma2"), tokenizer="byte"), LoraConfig(), tokenizer)
    logits = model(*batch, mode="ref")
    assert logits.abs().max() <= 0.5  # the cap was applied
    torch.testing.assert_close(logits, hf_logits(gemma, *batch))

    transformers.GraniteForCausalLM(transformers.GraniteConfig(**shape, logits_scaling=4.0)).save_pretrained(
        tmp_path / "granite"
    )
    with pytest.raises(NotImplementedError, match="post-processes its logits"):
        build_policy(PolicyConfig(name_or_path=str(tmp_path / "granite"), tokenizer="byte"), LoraConfig(), tokenizer)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, batch):
    grads = []
    for checkpointing in (False, True):
        model = build(tokenizer, LoraConfig(dropout=0.0), gradient_checkpointing=checkpointing).train()
        set_lora_b(model)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        logits, values = model(*batch)
        (logits.float().logsumexp(-1).mean() + values.mean()).backward()
        assert all(param.grad is None for param in model.parameters() if not param.requires_grad)
        grads.append({name: param.grad for name, param in model.named_parameters() if param.requires_grad})
    assert all(grad is not None for grad in grads[1].values())
    torch.testing.assert_close(grads[1], grads[0])


def test_policy_pickles_after_forward_and_generate(tokenizer, batch):
    model = build(tokenizer, gradient_checkpointing=True)
    set_lora_b(model)
    model(*batch)
    model(*batch, mode="ref")
    model(*batch, mode="generate", max_new_tokens=2, do_sample=False)
    restored = pickle.loads(pickle.dumps(model))
    logits, values = restored(*batch)
    torch.testing.assert_close(logits, model(*batch)[0])
    torch.testing.assert_close(values, model(*batch)[1])


def test_unknown_mode_is_refused(tokenizer, batch):
    with pytest.raises(ValueError, match="Unknown mode"):
        build(tokenizer)(*batch, mode="value")


def test_tiny_base_is_a_function_of_its_config():
    tokenizer = load_tokenizer(PolicyConfig())
    torch.manual_seed(1)
    first = build_policy(PolicyConfig(), LoraConfig(enabled=False), tokenizer)
    torch.manual_seed(2)  # the global RNG state must not matter
    second = build_policy(PolicyConfig(), LoraConfig(enabled=False), tokenizer)
    other = build_policy(PolicyConfig(tiny=TinyModelConfig(seed=1)), LoraConfig(enabled=False), tokenizer)
    for (name, a), b, c in zip(first.lm.named_parameters(), second.lm.parameters(), other.lm.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert not torch.equal(a, c) or a.std() == 0, name


def test_chunked_head_of_the_reference_refuses_grad(tokenizer, batch):
    # Its recomputation in the backward pass would run after the adapter-disabled block, i.e. with the adapter on.
    model = build(tokenizer)
    mask = batch[1].bool()

    def head(logits, rows):
        return (logits.sum(-1),)

    with pytest.raises(ValueError, match=r"reference forward with a chunked head must run without grad"):
        model(*batch, mode="ref", logits_mask=mask, head=head, head_chunk_size=2)
    with torch.no_grad():
        chunked = model(*batch, mode="ref", logits_mask=mask, head=head, head_chunk_size=2)
        whole = model(*batch, mode="ref", logits_mask=mask, head=head)
        logits = model(*batch, mode="ref", logits_mask=mask)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(whole[0], logits.sum(-1))


def test_a_tokenizer_that_encodes_nothing_is_refused_naming_the_field(tmp_path):
    # transformers 5.24 loads a Qwen2 directory's tokenizer as Qwen2Tokenizer whatever tokenizer_config.json names;
    # with ByT5's files there it has no vocabulary and encodes every text to nothing.
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, vocab_size=384)).save_pretrained(tmp_path)
    transformers.ByT5Tokenizer().save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"policy\.name_or_path='.*' loaded as Qwen2Tokenizer, which encodes text to no"
    ):
        load_tokenizer(PolicyConfig(name_or_path=str(tmp_path)))
    assert load_tokenizer(PolicyConfig(name_or_path=str(tmp_path), tokenizer="byte"))("ab")["input_ids"]


def test_dropout_is_turned_off_in_modules_and_configs_or_the_model_is_refused(tokenizer, batch):
    # GPT-2's config carries 0.1 dropouts, read by nn.Dropout modules; Llama's attention reads its config's
    # attention_dropout directly. Both must give the same outputs in training and eval mode once disabled.
    from lightning_rlhf.models import check_dropout_off, disable_dropout

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tokenizer), n_positions=64)
    ).train()
    with pytest.raises(NotImplementedError, match="training mode than in eval mode"):
        check_dropout_off(gpt2)
    check_dropout_off(disable_dropout(gpt2))
    assert gpt2.config.resid_pdrop == gpt2.config.attn_pdrop == gpt2.config.embd_pdrop == 0.0
    assert gpt2.training  # only the probabilities changed, not the mode
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=len(tokenizer),
            attention_dropout=0.5,
        )
    )
    assert llama.model.layers[0].self_attn.attention_dropout == 0.5
    with pytest.raises(NotImplementedError, match="training mode"):  # no nn.Dropout module: the attention's own float
        check_dropout_off(llama)
    disable_dropout(llama)
    assert llama.model.layers[0].self_attn.attention_dropout == 0.0
    assert llama.config.attention_dropout == 0.0
    check_dropout_off(llama)
