"""Paint-with-words: the attention bias lands only between the chosen tokens, with the fused attention path."""

import math

import pytest
import torch
import torch.nn.functional as F

from psunet.config import DiffusionConfig, preset
from psunet.model import Attention, PaintBias, PSUNet, paint_logit_bias
from psunet.paint import TEXT_OFFSET, PaintWithWords, box_region, paint_mask, token_region
from psunet.sampling import InfillRun, joint_infill, step_together

CONFIG = preset("tiny")  # 16 text tokens, 4x4 = 16 image tokens: shared sequence of 34
LENGTH = TEXT_OFFSET + CONFIG.text_len + CONFIG.image_tokens
IMAGE = TEXT_OFFSET + CONFIG.text_len


def left_half(size: int = 32) -> torch.Tensor:
    region = torch.zeros(size, size, dtype=torch.bool)
    region[:, : size // 2] = True
    return region


def test_regions_become_patch_tokens_and_a_symmetric_mask():
    assert token_region(left_half(), 4).view(4, 4)[:, :2].all()
    assert not token_region(left_half(), 4).view(4, 4)[:, 2:].any()
    paint = PaintWithWords([[(2, left_half())], []])
    mask = paint_mask(CONFIG, paint, torch.device("cpu"))
    assert mask.shape == (2, 1, LENGTH, LENGTH)
    chosen = {IMAGE + 4 * row + col for row in range(4) for col in range(2)}
    expected = torch.zeros(LENGTH, LENGTH)
    for patch in chosen:
        expected[patch, TEXT_OFFSET + 2] = expected[TEXT_OFFSET + 2, patch] = 1
    assert torch.equal(mask[0, 0], expected)
    assert not mask[1].any()


def attention_matrix(attention: Attention, tokens: torch.Tensor, paint: PaintBias | None) -> torch.Tensor:
    batch, length, width = tokens.shape
    q, k, _ = attention.qkv(tokens).view(batch, length, 3, attention.heads, -1).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if paint is not None:
        logits = logits + paint_logit_bias(q, k, paint)
    return logits.softmax(-1)


def test_the_bias_changes_attention_only_between_the_chosen_tokens():
    torch.manual_seed(0)
    attention = Attention(CONFIG.width, CONFIG.heads)
    tokens = torch.randn(2, LENGTH, CONFIG.width)
    mask = paint_mask(CONFIG, PaintWithWords([[(2, left_half())], [(2, left_half())]]), torch.device("cpu"))
    paint = PaintBias(mask, torch.tensor([2.0, 0.0]))  # sample 1: zero strength = no bias

    q, k, _ = attention.qkv(tokens).view(2, LENGTH, 3, CONFIG.heads, -1).permute(2, 0, 3, 1, 4)
    bias = paint_logit_bias(q, k, paint)
    logits_max = (q @ k.transpose(-2, -1)).amax((-2, -1)) / math.sqrt(q.shape[-1])
    expected = 2.0 * logits_max[0][:, None, None] * mask[0]
    assert torch.allclose(bias[0], expected) and (bias[0] != 0).sum() == CONFIG.heads * 16
    assert not bias[1].any()

    plain, painted = attention_matrix(attention, tokens, None), attention_matrix(attention, tokens, paint)
    rows = mask[0, 0].any(-1)  # queries that are a painted patch or the painted word
    assert torch.allclose(painted[0][:, ~rows], plain[0][:, ~rows])
    assert torch.allclose(painted[1], plain[1])
    chosen = mask[0, 0].bool()
    sign = torch.sign(logits_max[0])[:, None, None].expand(-1, LENGTH, LENGTH)
    moved = (painted[0] - plain[0])[:, chosen]
    assert ((moved * sign[:, chosen]) > 0).all()  # the chosen pairs gain weight when max(QK^T) > 0

    # the module's fused path gives the same output as the explicit attention matrix
    _, _, v = attention.qkv(tokens).view(2, LENGTH, 3, CONFIG.heads, -1).permute(2, 0, 3, 1, 4)
    explicit = (painted @ v).transpose(1, 2).reshape(2, LENGTH, CONFIG.width)
    assert torch.allclose(attention(tokens, paint), attention.proj(explicit), atol=1e-5)


def test_without_paint_the_model_takes_the_fused_path_with_no_mask(monkeypatch):
    seen = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = PSUNet(CONFIG).eval()
    with torch.no_grad():
        joint_infill(model, CONFIG, DiffusionConfig(), 1, steps=2, scheduler="ddim")
        assert all(mask is None for mask in seen)
        seen.clear()
        joint_infill(model, CONFIG, DiffusionConfig(), 1, steps=2, scheduler="ddim",
                     text_known=torch.randn(1, 16, 16), text_mask=torch.ones(1, 16),
                     paint=PaintWithWords([[(1, left_half())]], weight=1.0, fraction=0.5))
    per_step = len(seen) // 2  # two steps; only the first (fraction 0.5) is painted
    masked = [mask for mask in seen if mask is not None]
    assert len(masked) == per_step - 2 * (CONFIG.n_text + CONFIG.n_image)  # the shared blocks of step one
    assert masked[0].shape == (2, CONFIG.heads, LENGTH, LENGTH)
    assert masked[0][1].abs().sum() == 0  # the unconditional half gets no bias


def test_painting_changes_the_samples_and_only_those_painted():
    model = PSUNet(CONFIG).eval()
    text = torch.randn(2, 16, 16)
    common = dict(text_known=text, text_mask=torch.ones(2, 16), steps=4, scheduler="ddim", seeds=[1, 2])
    plain = joint_infill(model, CONFIG, DiffusionConfig(), 2, **common)
    painted = joint_infill(model, CONFIG, DiffusionConfig(), 2, **common,
                           paint=PaintWithWords([[(0, left_half())], []], weight=4.0))
    assert not torch.allclose(plain.image_latents[0], painted.image_latents[0])
    assert torch.allclose(plain.image_latents[1], painted.image_latents[1], atol=1e-5)


def test_a_painted_run_and_a_plain_one_share_forwards_and_give_what_they_give_alone():
    model = PSUNet(CONFIG).eval()
    text = torch.randn(2, 16, 16)
    paint = PaintWithWords([[(0, left_half())]], weight=4.0, fraction=0.5)  # biased for the first 2 of 4 steps
    settings = [dict(text_known=text[:1], steps=4, scheduler="ddim", seed=1, paint=paint),
                dict(text_known=text[1:], steps=4, scheduler="ddim", seed=2)]
    alone = [joint_infill(model, CONFIG, DiffusionConfig(), 1, **kw) for kw in settings]
    runs = [InfillRun(CONFIG, DiffusionConfig(), 1, **kw) for kw in settings]
    while not runs[0].done:
        step_together(model, runs)
    for run, expected in zip(runs, alone):
        assert torch.allclose(run.result().image_latents, expected.image_latents, atol=1e-4)


@pytest.mark.parametrize("paint, message", [
    (PaintWithWords([[(16, left_half())]]), "word index 16 is outside the caption"),
    (PaintWithWords([[(-1, left_half())]]), "outside the caption"),
    (PaintWithWords([[(1, torch.ones(30, 30, dtype=torch.bool))]]), "multiple of the 4x4 patch grid"),
    (PaintWithWords([[(1, torch.ones(32, 16, dtype=torch.bool))]]), "square"),
    (PaintWithWords([[(1, left_half())]], weight=-1), "weight"),
    (PaintWithWords([[(1, left_half())]], fraction=0), "fraction"),
    (PaintWithWords([[(1, left_half())], []]), "one list per sample"),
])
def test_bad_paint_is_refused(paint, message):
    with pytest.raises(ValueError, match="paint") as error:
        joint_infill(PSUNet(CONFIG).eval(), CONFIG, DiffusionConfig(), 1, steps=2, paint=paint)
    assert message in str(error.value)


def test_a_box_becomes_a_region_and_a_bad_box_is_refused_with_the_reason():
    region = box_region([2, 1, 5, 3], 8)
    assert region.shape == (8, 8) and region.dtype == bool and region.sum() == 6
    assert region[1:3, 2:5].all() and not region[0].any() and not region[:, 5:].any()
    for box, reason in (([0, 0, 9, 4], "must lie inside the 8x8 image"), ([3, 0, 3, 4], "x0 < x1"),
                        ([0, 0, 4], "4 whole numbers"), ([0, 0, 4, 2.5], "4 whole numbers")):
        with pytest.raises(ValueError, match=reason):
            box_region(box, 8)
