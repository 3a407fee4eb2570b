"""SFT: the response-only loss by hand, prompt tokens ignored (by construction and in a fit), and the saved model."""

import math
import random

import pytest
import torch
import transformers
from lightning import Trainer

from lightning_rlhf.data import SFTDataModule
from lightning_rlhf.functional import sft_loss, sft_token_loss
from lightning_rlhf.models import LoraConfig, PolicyConfig, TinyModelConfig, packing
from lightning_rlhf.sft import SFTModule

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def tiny_sft(lora_enabled=False, lr=1e-2, **kwargs):
    return SFTModule(
        policy=PolicyConfig(tiny=TINY),
        lora=LoraConfig(enabled=lora_enabled, modules_to_save=["lm_head"] if lora_enabled else None),
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        **kwargs,
    )


def trainer(max_steps):
    return Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


# ------------------------------------------------------------------------------------------------------ the loss
def test_sft_loss_by_hand():
    # Vocabulary of 2. Row 0: tokens [0, 1, 0], only the last is a response token; it is predicted at position 1
    # with logits [ln 3, 0]: p(0) = 3/4, NLL = ln(4/3) = 0.287682. The logits at position 0 ([5, -5]) predict a
    # prompt token and must not count. Row 1: tokens [0, 1, 0], response = the last two: position 0 predicts 1 with
    # [0, 0] (NLL ln 2 = 0.693147, argmax 0 misses), position 1 predicts 0 with [ln 3, 0] (0.287682, argmax hits).
    # Token-mean over the 3 trained tokens: (0.287682 + 0.693147 + 0.287682) / 3 = 0.422837; accuracy 2/3.
    ln3 = math.log(3.0)
    logits = torch.tensor(
        [[[5.0, -5.0], [ln3, 0.0], [9.0, 9.0]], [[0.0, 0.0], [ln3, 0.0], [9.0, 9.0]]], requires_grad=True
    )
    input_ids = torch.tensor([[0, 1, 0], [0, 1, 0]])
    loss_mask = torch.tensor([[False, False, True], [False, True, True]])
    loss, stats = sft_loss(logits, input_ids, loss_mask)
    torch.testing.assert_close(loss, torch.tensor(0.422837))
    torch.testing.assert_close(stats.token_accuracy, torch.tensor(2 / 3))
    assert stats.num_tokens.item() == 3


def test_sft_loss_ignores_prompt_and_padding_positions():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=generator, requires_grad=True)
    input_ids = torch.randint(0, 11, (3, 6), generator=generator)
    loss_mask = torch.tensor([[False, False, True, True, False, False]] * 3)  # prompt, response, padding
    loss, _ = sft_loss(logits, input_ids, loss_mask)
    loss.backward()
    # Logits at t predict token t + 1: only positions 1 and 2 (predicting the response tokens 2 and 3) matter.
    trained_positions = torch.tensor([False, True, True, False, False, False])
    assert logits.grad[:, ~trained_positions].abs().max() == 0
    assert logits.grad[:, trained_positions].abs().min() > 0
    changed = logits.detach().clone()
    changed[:, ~trained_positions] = 1e4  # any value in the prompt and padding positions
    changed_ids = input_ids.clone()
    changed_ids[:, :2] = 0  # other prompt tokens (as targets; the logits are fixed here)
    changed_ids[:, 4:] = 0
    torch.testing.assert_close(sft_loss(changed, changed_ids, loss_mask)[0], loss.detach())


def test_sft_token_loss_by_hand():
    # Rows predict token 1 with logits [0, ln 3] (p = 3/4, NLL ln(4/3) = 0.287682, argmax hits) and [ln 3, 0]
    # (p = 1/4, NLL ln 4 = 1.386294, argmax misses): mean NLL 0.836988, accuracy 1/2.
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3], [ln3, 0.0]], requires_grad=True)
    loss, stats = sft_token_loss(logits, torch.tensor([1, 1]))
    torch.testing.assert_close(loss, torch.tensor(0.836988))
    torch.testing.assert_close(stats.token_accuracy, torch.tensor(0.5))
    assert stats.num_tokens.item() == 2
    loss.backward()  # d NLL / d logits = (softmax - onehot) / N
    torch.testing.assert_close(logits.grad, torch.tensor([[0.125, -0.125], [0.375, -0.375]]))
    empty, empty_stats = sft_token_loss(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0
    assert empty_stats.num_tokens.item() == 0
    assert empty_stats.token_accuracy.item() == 0


def test_sft_loss_refuses_a_trained_first_token():
    with pytest.raises(ValueError, match=r"loss_mask\[:, 0\] must be False"):
        sft_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.tensor([[True, True]]))


def test_module_loss_is_the_response_only_nll_of_its_logits():
    module = tiny_sft()
    module.configure_model()
    rows = [{"prompt": "topic: cat\n", "response": "jolly cat"}, {"prompt": "topic: ox\n", "response": "ox"}]
    data = SFTDataModule(examples=rows, batch_size=2, tokenizer=module.tokenizer)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        logprobs = torch.log_softmax(module(batch["input_ids"], batch["attention_mask"]).float(), -1)[:, :-1]
        token_logprobs = logprobs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    response = batch["loss_mask"][:, 1:]
    torch.testing.assert_close(loss, -token_logprobs[response].mean())
    # The check above can fail: counting the prompt tokens gives another value.
    assert not torch.isclose(loss, -token_logprobs[batch["attention_mask"][:, 1:]].mean())


def batch_of_different_lengths(module):
    rows = [
        {"prompt": "topic: cat\n", "response": "a jolly cat sat on the mat all day"},
        {"prompt": "topic: ox\n", "response": "ox"},
        {"prompt": "t: owl\n", "response": "owls"},
        {"prompt": "topic: a bee\n", "response": "it hums"},
    ]
    data = SFTDataModule(examples=rows, batch_size=4, tokenizer=module.tokenizer, shuffle=False)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def decoder_rows(module, batch):
    """Rows in the loss forward (B padded, fewer packed), the loss, its stats and the gradients for ``batch``."""
    rows = []
    decoder = module.lm.get_base_model().get_decoder() if module.lora_config.enabled else module.lm.get_decoder()
    handle = decoder.register_forward_hook(
        lambda mod, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    module.zero_grad()
    loss, stats = module.loss(batch)
    loss.backward()
    handle.remove()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return rows[-1], loss.detach(), stats, grads  # before it, the packing probe's one-row forwards


@pytest.mark.parametrize("lora_enabled", [False, True], ids=["full", "lora"])
def test_packed_loss_and_gradient_equal_the_padded_ones(lora_enabled):
    torch.manual_seed(0)
    module = tiny_sft(lora_enabled=lora_enabled)
    module.configure_model()
    if lora_enabled:  # a trained-looking adapter, so its gradient path is not trivially zero
        with torch.no_grad():
            for name, param in module.lm.named_parameters():
                if "lora_B" in name:
                    param.add_(0.05 * torch.randn_like(param))
    batch = batch_of_different_lengths(module)
    padded_rows, padded_loss, padded_stats, padded_grads = decoder_rows(module, batch)
    module.packing = True
    packed_rows, packed_loss, packed_stats, packed_grads = decoder_rows(module, batch)
    assert padded_rows == 4
    assert packed_rows == 2
    torch.testing.assert_close(packed_loss, padded_loss)
    torch.testing.assert_close(packed_stats.token_accuracy, padded_stats.token_accuracy)
    assert packed_grads.keys() == padded_grads.keys()
    assert len(packed_grads) > 0
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, msg=name)


def test_lm_head_chunks_give_the_same_loss_and_gradient():
    module = tiny_sft()  # full fine-tuning: lm_head's own gradient goes through the recomputed chunks
    module.configure_model()
    batch = batch_of_different_lengths(module)
    rows = []  # rows of every lm_head call
    module.lm.lm_head.register_forward_hook(lambda mod, args, out: rows.append(out.shape[0]))
    _, whole_loss, whole_stats, whole_grads = decoder_rows(module, batch)
    trained = int(batch["loss_mask"].sum())
    assert rows == [trained]
    rows.clear()
    module.lm_head_chunk_size = 4
    _, chunked_loss, chunked_stats, chunked_grads = decoder_rows(module, batch)
    assert max(rows) == 4
    assert sum(rows) == 2 * trained  # every chunk ran again in the backward pass
    torch.testing.assert_close(chunked_loss, whole_loss)
    torch.testing.assert_close(chunked_stats.token_accuracy, whole_stats.token_accuracy)
    assert "lm.lm_head.weight" in chunked_grads
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, msg=name)
    with pytest.raises(ValueError, match=r"model\.lm_head_chunk_size=0 is invalid"):
        tiny_sft(lm_head_chunk_size=0)


def test_packing_refuses_a_model_whose_attention_crosses_sequences_naming_the_field(monkeypatch):
    module = tiny_sft(packing=True)
    module.configure_model()
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match=r"model\.packing: .*LlamaModel.*Set model\.packing: false"):
        module.loss(batch_of_different_lengths(module))
    assert module.lm.get_decoder() not in packing._verified


def test_packed_fit_trains_the_same_weights_as_the_padded_fit():
    rows = [{"prompt": "topic: " + "ab" * k, "response": "xyz"[: 1 + k % 3] * (1 + k)} for k in range(8)]
    runs = []
    for packed in (False, True):
        torch.manual_seed(0)
        module = tiny_sft(lr=1e-2, packing=packed)
        module.configure_model()
        initial = {name: p.detach().clone() for name, p in module.lm.named_parameters()}
        trainer(max_steps=3).fit(module, SFTDataModule(examples=rows, batch_size=4, seed=0))
        runs.append((module, initial))
    (padded, initial), (packed, _) = runs
    assert packed.hparams.packing is True
    final = dict(padded.lm.named_parameters())
    assert not torch.equal(final["lm_head.weight"], initial["lm_head.weight"])  # 3 steps moved the weights
    for name, param in packed.lm.named_parameters():
        torch.testing.assert_close(param, final[name], msg=name)


def test_fit_learns_the_response_after_unlearnable_prompts():
    # Prompts are random bytes (nothing to learn); the response is always "ok". A response-only loss falls towards 0
    # within a few dozen steps; a loss over prompt tokens too could not go below ~ln(26) per prompt token.
    rng = random.Random(0)
    rows = [{"prompt": "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=8)), "response": "ok"} for _ in range(64)]
    module = tiny_sft(lr=1e-2)
    fit = trainer(max_steps=40)
    fit.fit(module, SFTDataModule(examples=rows, batch_size=16, seed=0))
    assert fit.callback_metrics["train/loss"] < 0.3
    assert fit.callback_metrics["train/token_accuracy"] > 0.9


# ---------------------------------------------------------------------------------------------------- the export
def test_full_fine_tuning_saves_a_loadable_model_and_tokenizer(tmp_path):
    module = tiny_sft()
    module.configure_model()
    module.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tokenizer, transformers.ByT5Tokenizer)
    ids = torch.tensor([tokenizer("topic: owl\n")["input_ids"]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module(ids, mask))


def test_lora_saves_merged_weights_and_the_adapter(tmp_path):
    module = tiny_sft(lora_enabled=True)
    module.configure_model()
    with torch.no_grad():  # a trained-looking adapter (B starts at 0, which would make the merge trivial)
        for name, param in module.lm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    module.save_pretrained(tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("lora" in name for name in loaded.state_dict())
    ids = torch.tensor([module.tokenizer("topic: owl\n")["input_ids"]])
    with torch.no_grad():
        ours = module(ids, torch.ones_like(ids, dtype=torch.bool))
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours)
        with module.lm.disable_adapter():  # the adapter matters, so equal logits mean it was merged
            assert not torch.allclose(module.lm(input_ids=ids).logits, ours)
    # The merge ran on a copy: the module still has its adapter and can train on.
    assert any("lora_A" in name for name, _ in module.lm.named_parameters())


def test_lr_scheduler_steps_every_optimizer_step():
    module = SFTModule(
        policy=PolicyConfig(tiny=TINY),
        lora=LoraConfig(enabled=False),
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1)),
    )
    fit = trainer(max_steps=3)
    fit.fit(module, SFTDataModule(examples=[{"prompt": "a", "response": "b"}] * 8, batch_size=2))
    # One epoch is 4 batches, so only a per-step scheduler has stepped 3 times: lr = 1 / (3 + 1).
    assert fit.optimizers[0].param_groups[0]["lr"] == 0.25
