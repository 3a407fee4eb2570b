"""Tests of lightning_rlhf.modes.eval_mode: dropout off in the body, each submodule's own flag restored."""

import pytest
import torch
from torch import nn

from lightning_rlhf.modes import eval_mode


def test_eval_mode_turns_dropout_off_and_restores_each_flag():
    model = nn.Sequential(nn.Dropout(0.5), nn.Sequential(nn.Linear(2, 2)))
    model.train()
    model[1].eval()  # a submodule that keeps its own flag, like the frozen reference copy
    before = {name: m.training for name, m in model.named_modules()}
    x = torch.ones(100)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        assert torch.equal(model[0](x), x)  # dropout is the identity in eval mode
    assert {name: m.training for name, m in model.named_modules()} == before
    assert before == {"": True, "0": True, "1": False, "1.0": False}


def test_eval_mode_restores_the_flags_when_the_body_raises():
    model = nn.Sequential(nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert all(m.training for m in model.modules())
