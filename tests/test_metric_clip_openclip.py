"""nn.InfoNCELoss as open_clip's users hold it: the learnable ``logit_scale`` (the log of the
multiplier, open_clip's name and meaning) trains as open_clip's ClipLoss does (AdamW steps of a tiny
CLIP-style model against a float64 reference written plainly in PyTorch), and state dicts map: an
open_clip ``logit_scale`` entry loads, and so does an earlier fastloss one named ``log_scale``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastloss

from conftest import assert_close


class ReferenceClip(torch.nn.Module):
    """open_clip's CLIP reduced to two linear towers: ``logit_scale`` holds log(1 / 0.07), the loss is
    ClipLoss on ``logit_scale.exp()`` (cross entropy of scale * q k^T both ways)."""

    def __init__(self, image_dim=10, text_dim=12, embed_dim=8):
        super().__init__()
        self.visual = torch.nn.Linear(image_dim, embed_dim)
        self.text = torch.nn.Linear(text_dim, embed_dim)
        self.logit_scale = torch.nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def forward(self, images, texts):
        q = F.normalize(self.visual(images), dim=-1)
        k = F.normalize(self.text(texts), dim=-1)
        logits = self.logit_scale.exp() * q @ k.T
        target = torch.arange(q.shape[0])
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class OurClip(torch.nn.Module):
    """The same towers with fastloss.nn.InfoNCELoss holding the scale."""

    def __init__(self, image_dim=10, text_dim=12, embed_dim=8):
        super().__init__()
        self.visual = torch.nn.Linear(image_dim, embed_dim)
        self.text = torch.nn.Linear(text_dim, embed_dim)
        self.loss = fastloss.nn.InfoNCELoss(symmetric=True, learnable_scale=True)

    def forward(self, images, texts):
        return self.loss(self.visual(images), self.text(texts))


def test_adamw_steps_match_open_clip_style_clip_loss(device):
    torch.manual_seed(0)
    reference = ReferenceClip().double()
    ours = OurClip()
    ours.visual.load_state_dict(reference.visual.state_dict())
    ours.text.load_state_dict(reference.text.state_dict())
    assert_close(ours.loss.logit_scale, reference.logit_scale, 1e-7, "initial logit_scale: log(1 / 0.07)")
    ours = ours.to(torch.device(str(device)))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 10, generator=g, dtype=torch.float64), torch.randn(16, 12, generator=g,
                                                                                   dtype=torch.float64))
               for _ in range(4)]  # fmt: skip
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    names = [n for n, _ in reference.named_parameters()]
    for step, (images, texts) in enumerate(batches):
        loss_ref = reference(images, texts)
        loss_ours = ours(images.float().to(device), texts.float().to(device))
        assert_close(loss_ours, loss_ref, 2e-5, f"loss at step {step}")
        opt_ref.zero_grad()
        opt_ours.zero_grad()
        loss_ref.backward()
        loss_ours.backward()
        ref_grads = dict(reference.named_parameters())
        for name, p in ours.named_parameters():
            ref_name = "logit_scale" if name == "loss.logit_scale" else name
            assert ref_name in names
            assert_close(p.grad, ref_grads[ref_name].grad, 1e-4, f"gradient of {name} at step {step}")
        opt_ref.step()
        opt_ours.step()
        with torch.no_grad():  # open_clip's clamp of the log after each step (inactive here: both stay far below)
            reference.logit_scale.clamp_(0, math.log(100))
    assert float(reference.logit_scale.detach()) != math.log(1 / 0.07)  # the scale did train
    assert_close(ours.loss.logit_scale, reference.logit_scale, 1e-5, "logit_scale after the steps")


def test_state_dicts_map_to_open_clip_and_to_earlier_fastloss():
    reference = ReferenceClip()
    with torch.no_grad():
        reference.logit_scale.fill_(3.1)
    loss = fastloss.nn.InfoNCELoss(symmetric=True, learnable_scale=True)
    assert list(loss.state_dict()) == ["logit_scale"]  # open_clip's key
    loss.load_state_dict({"logit_scale": reference.state_dict()["logit_scale"]})
    assert float(loss.logit_scale.detach()) == pytest.approx(3.1)
    # the model's own key maps with the usual prefix handling of load_state_dict
    ours = OurClip()
    state = {("loss." + k if k == "logit_scale" else k): v for k, v in reference.state_dict().items()}
    ours.load_state_dict(state)
    assert float(ours.loss.logit_scale.detach()) == pytest.approx(3.1)
    # an earlier fastloss state dict (the same log, named log_scale) still loads, here and nested
    loss.load_state_dict({"log_scale": torch.tensor(2.0)})
    assert float(loss.logit_scale.detach()) == 2.0
    ours.load_state_dict({**{k: v for k, v in state.items() if k != "loss.logit_scale"},
                          "loss.log_scale": torch.tensor(1.5)})  # fmt: skip
    assert float(ours.loss.logit_scale.detach()) == 1.5
    with pytest.raises(RuntimeError, match="Unexpected key"):  # strict loading still reports what is wrong
        loss.load_state_dict({"logit_scale": torch.tensor(1.0), "other": torch.tensor(1.0)})
    with pytest.warns(FutureWarning, match="'log_scale' is now named 'logit_scale'"):
        assert loss.log_scale is loss.logit_scale
    assert list(fastloss.nn.InfoNCELoss().state_dict()) == []  # a fixed temperature holds no parameter


def test_the_multiplier_is_clamped_at_max_scale_and_passed_per_call():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    loss = fastloss.nn.InfoNCELoss(symmetric=True, learnable_scale=True, max_scale=100.0).double()
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(250.0))
    logits = 100.0 * F.normalize(q, dim=1) @ F.normalize(k, dim=1).T
    target = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    assert_close(loss(q, k), expected, 1e-12, "clamped at 100")
    # open_clip's ClipLoss takes the multiplier per call: scale=
    clip = fastloss.nn.InfoNCELoss(symmetric=True)
    assert_close(clip(q, k, scale=torch.tensor(100.0, dtype=torch.float64)), expected, 1e-12, "scale per call")
    with pytest.raises(ValueError, match="^fastloss.nn.InfoNCELoss: argument 'scale'"):
        loss(q, k, scale=torch.tensor(100.0))
    with pytest.raises(TypeError, match="pass it as scale="):  # ClipLoss's positional third argument
        clip(q, k, torch.tensor(100.0))
