"""Training objective: loss masking under modality dropout, min-SNR, EMA, and a tiny overfit."""

import pytest
import torch
from pydantic import ValidationError

from psunet.config import DiffusionConfig, preset
from psunet.diffusion import NoiseSchedule, diffusion_loss, make_scheduler
from psunet.ema import EMA
from psunet.model import PSUNet


def batch(config, size=4):
    return torch.randn(size, *config.latent_shape), torch.randn(size, config.text_len, config.word_dim)


def test_add_noise_comes_from_the_diffusers_schedule():
    schedule = NoiseSchedule(DiffusionConfig())
    x0, noise = torch.ones(2, 3), torch.zeros(2, 3)
    t = torch.tensor([0, 999])
    alpha_bar = make_scheduler("ddpm", DiffusionConfig()).alphas_cumprod[t]
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), alpha_bar.sqrt()[:, None].expand(2, 3))
    assert schedule.snr(torch.tensor([0]))[0] > schedule.snr(torch.tensor([999]))[0]


@pytest.mark.parametrize("dropped", ["text", "image"])
def test_dropped_modality_gets_no_loss_gradient(dropped):
    model_config = preset("tiny")
    model = PSUNet(model_config)
    config = DiffusionConfig(p_drop_text=1.0 if dropped == "text" else 0.0,
                             p_drop_image=1.0 if dropped == "image" else 0.0)
    out = diffusion_loss(model, NoiseSchedule(config), config, *batch(model_config))
    dropped_loss = out.loss_text if dropped == "text" else out.loss_image
    kept_loss = out.loss_image if dropped == "text" else out.loss_text
    assert dropped_loss.item() == 0.0 and kept_loss.item() > 0
    out.loss.backward()
    head = model.text_head if dropped == "text" else model.image_head
    assert head.weight.grad.abs().sum().item() == 0.0
    other_head = model.image_head if dropped == "text" else model.text_head
    assert other_head.weight.grad.abs().sum().item() > 0


def test_dropped_modality_input_is_independent_of_data():
    """With the text dropped, changing the text data must not change anything the model sees."""
    model_config = preset("tiny")
    model = PSUNet(model_config)
    config = DiffusionConfig(p_drop_text=1.0, p_drop_image=0.0)
    image, text = batch(model_config)
    losses = [diffusion_loss(model, NoiseSchedule(config), config, image, t, torch.Generator().manual_seed(3)).loss
              for t in (text, text * 5 + 2)]
    torch.testing.assert_close(losses[0], losses[1])


def test_dropout_rate_is_respected():
    model_config = preset("tiny")
    config = DiffusionConfig(p_drop_text=0.3, p_drop_image=0.0)
    out = diffusion_loss(PSUNet(model_config), NoiseSchedule(config), config, *batch(model_config, 2000))
    assert out.kept_image.mean().item() == 1.0
    assert abs(1 - out.kept_text.mean().item() - 0.3) < 0.05


def test_min_snr_weighting_lowers_low_noise_terms():
    model_config = preset("tiny")
    model = PSUNet(model_config)
    data = batch(model_config, 64)
    plain = DiffusionConfig(p_drop_text=0, p_drop_image=0)
    weighted = plain.model_copy(update={"min_snr_gamma": 5.0})
    loss_plain = diffusion_loss(model, NoiseSchedule(plain), plain, *data, torch.Generator().manual_seed(0))
    loss_weighted = diffusion_loss(model, NoiseSchedule(weighted), weighted, *data, torch.Generator().manual_seed(0))
    assert loss_weighted.loss.item() < loss_plain.loss.item()


def test_bad_diffusion_config_names_the_field():
    with pytest.raises(ValidationError, match="p_drop_text"):
        DiffusionConfig(p_drop_text=1.5)
    with pytest.raises(ValidationError, match="beta_schedule"):
        DiffusionConfig(beta_schedule="cosine-ish")


def test_ema_tracks_weights():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    start = ema.model.weight.clone()
    for _ in range(50):
        ema.update(model)
    assert torch.allclose(ema.model.weight, torch.ones(2, 2), atol=1e-6)
    assert not torch.allclose(start, torch.ones(2, 2))
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_tiny_model_overfits_one_batch():
    """Proof the pieces fit together: loss on one fixed batch falls by >= 10x."""
    torch.manual_seed(0)
    model_config = preset("tiny").model_copy(update={"width": 64})
    model = PSUNet(model_config)
    config = DiffusionConfig(p_drop_text=0.0, p_drop_image=0.0)
    schedule = NoiseSchedule(config)
    image, text = batch(model_config, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def fixed_noise_loss():
        return diffusion_loss(model, schedule, config, image, text, torch.Generator().manual_seed(0)).loss

    with torch.no_grad():
        initial = fixed_noise_loss().item()
    for _ in range(300):
        optimizer.zero_grad()
        loss = fixed_noise_loss()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = fixed_noise_loss().item()
    assert final < initial / 10, (initial, final)
