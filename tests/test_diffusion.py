"""Training objective: loss masking under modality dropout, min-SNR, EMA, and a tiny overfit."""

import pytest
import torch
from pydantic import ValidationError

from psunet.config import DiffusionConfig, OptimConfig, preset
from psunet.diffusion import NoiseSchedule, conditional_gaps, diffusion_loss, make_scheduler, rounding_loss
from psunet.ema import EMA
from psunet.model import ModelOutput, PSUNet
from psunet.training import Trainer, native_bf16, uses_bf16

PLAIN_EPSILON = {"prediction": "epsilon", "min_snr_gamma": None, "snr_floor": None}  # the unweighted epsilon loss


class ZeroModel(torch.nn.Module):
    """Predicts zero noise and records what it was given."""

    def forward(self, image, text, times):
        self.image, self.text, self.times = image, text, times
        return ModelOutput(eps_image=torch.zeros_like(image), eps_text=torch.zeros_like(text))


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
    config = DiffusionConfig(p_drop_text=0.3, p_drop_image=0.0, timesteps="shared")
    out = diffusion_loss(PSUNet(model_config), NoiseSchedule(config), config, *batch(model_config, 2000))
    assert out.kept_image.mean().item() == 1.0
    assert abs(1 - out.kept_text.mean().item() - 0.3) < 0.05


def test_min_snr_weighting_lowers_low_noise_terms():
    model_config = preset("tiny")
    model = PSUNet(model_config)
    data = batch(model_config, 64)
    plain = DiffusionConfig(p_drop_text=0, p_drop_image=0, **PLAIN_EPSILON)
    weighted = plain.model_copy(update={"min_snr_gamma": 5.0})
    loss_plain = diffusion_loss(model, NoiseSchedule(plain), plain, *data, torch.Generator().manual_seed(0))
    loss_weighted = diffusion_loss(model, NoiseSchedule(weighted), weighted, *data, torch.Generator().manual_seed(0))
    assert loss_weighted.loss.item() < loss_plain.loss.item()


def test_slices_train_each_conditional_with_the_other_modality_clean_at_time_zero():
    model_config = preset("tiny")
    config = DiffusionConfig(p_drop_text=0, p_drop_image=0, slice_weights={
        "joint": 0.2, "text_to_image": 0.3, "image_to_text": 0.4, "independent": 0.1})
    image, text = batch(model_config, 4000)
    model = ZeroModel()
    out = diffusion_loss(model, NoiseSchedule(config), config, image, text, torch.Generator().manual_seed(0))
    t_image, t_text = model.times
    clean_image = (model.image == image).flatten(1).all(1)
    clean_text = (model.text == text).flatten(1).all(1)
    # a clean modality is the data itself, at time 0, with no loss term; the other one is noised
    assert bool((t_image[clean_image] == 0).all()) and bool((t_text[clean_text] == 0).all())
    assert not bool((clean_image & clean_text).any())
    assert torch.equal(out.kept_image, (~clean_image).float()) and torch.equal(out.kept_text, (~clean_text).float())
    joint = ~clean_image & ~clean_text & (t_image == t_text)
    fractions = [x.float().mean().item() for x in (clean_text, clean_image, joint)]
    assert abs(fractions[0] - 0.3) < 0.03 and abs(fractions[1] - 0.4) < 0.03 and abs(fractions[2] - 0.2) < 0.03


@pytest.mark.parametrize("timesteps", ["independent", "slices"])
def test_a_dropped_modality_is_labelled_the_last_time_as_the_sampler_labels_it(timesteps):
    model_config = preset("tiny")
    joint_only = {"joint": 1.0, "text_to_image": 0.0, "image_to_text": 0.0}  # no clean text: no loss = dropped
    config = DiffusionConfig(p_drop_text=0.5, p_drop_image=0.0, timesteps=timesteps, slice_weights=joint_only)
    model = ZeroModel()
    out = diffusion_loss(model, NoiseSchedule(config), config, *batch(model_config, 400))
    dropped = out.kept_text == 0
    assert bool((model.times[1][dropped] == config.num_train_timesteps - 1).all())
    assert 0.4 < dropped.float().mean().item() < 0.6
    assert model.times[1][~dropped].float().std() > 100  # kept text: times drawn over the whole range


def test_min_snr_weight_of_the_text_uses_the_texts_own_snr():
    """Scaling the word vectors by s multiplies their SNR by s^2, so their min-SNR weight is min(s^2 SNR, g)/(s^2 SNR)."""
    model_config = preset("tiny")
    image, text = batch(model_config, 256)
    losses = {}
    for scale in (1.0, 3.0):
        config = DiffusionConfig(p_drop_text=0, p_drop_image=0, timesteps="shared", text_scale=scale,
                                 **{**PLAIN_EPSILON, "min_snr_gamma": 1.0})
        model = ZeroModel()
        out = diffusion_loss(model, NoiseSchedule(config), config, image, text, torch.Generator().manual_seed(0))
        snr = NoiseSchedule(config).snr(model.times) * scale ** 2
        noise = torch.Generator().manual_seed(0)
        torch.randint(0, 1000, (256,), generator=noise)  # the times, drawn first
        torch.randn(image.shape, generator=noise)
        err = torch.randn(text.shape, generator=noise).pow(2).flatten(1).mean(1)
        expected = (err * torch.clamp(snr, max=1.0) / snr).mean()
        torch.testing.assert_close(out.loss_text, expected)
        losses[scale] = out.loss_text.item()
    assert losses[3.0] < losses[1.0]


def test_legacy_independent_timesteps_switch_still_loads():
    assert DiffusionConfig.model_validate({"independent_timesteps": True}).timesteps == "independent"
    assert DiffusionConfig.model_validate({"independent_timesteps": False}).timesteps == "shared"
    assert DiffusionConfig().timesteps == "slices" and DiffusionConfig().conditions_clean
    with pytest.raises(ValidationError, match="slice_weights"):
        DiffusionConfig(slice_weights={"joint": 0, "text_to_image": 0, "image_to_text": 0})


class ReadsImageFromText(torch.nn.Module):
    """Knows the clean image when it is given the caption clean (the caption holds the image's numbers):
    then its image noise prediction is exact; it never predicts the text's noise."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, image, text, times):
        alpha_bar = self.schedule.alphas_cumprod[times[0]].view(-1, 1, 1, 1)
        clean_caption = (times[1] == 0).view(-1, 1, 1, 1)
        exact = (image - alpha_bar.sqrt() * text.reshape(image.shape)) / (1 - alpha_bar).sqrt()
        return ModelOutput(eps_image=torch.where(clean_caption, exact, image), eps_text=torch.zeros_like(text))


def test_conditional_gaps_measure_what_the_other_modality_buys():
    model_config = preset("tiny")  # 4x8x8 latents and 16x16 word vectors: the same number of values
    image = torch.randn(64, *model_config.latent_shape)
    text = image.reshape(64, model_config.text_len, model_config.word_dim)
    config = DiffusionConfig()
    schedule = NoiseSchedule(config)
    gaps = conditional_gaps(ReadsImageFromText(schedule), schedule, config, image, text,
                            torch.Generator().manual_seed(0))
    assert gaps["gap_image"] > 0.05 and gaps["gap_text"] == 0.0


class KnowsTheCleanText(torch.nn.Module):
    """Predicts the clean word vectors exactly (text_target "sample"), whatever the noise."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def forward(self, image, text, times):
        return ModelOutput(eps_image=torch.zeros_like(image), eps_text=self.text)


def test_a_text_head_predicting_the_clean_vectors_is_converted_to_noise_exactly():
    model_config = preset("tiny")
    image, text = batch(model_config, 32)
    config = DiffusionConfig(text_target="sample", timesteps="shared", p_drop_text=0, p_drop_image=0,
                             num_train_timesteps=1000)
    out = diffusion_loss(KnowsTheCleanText(text), NoiseSchedule(config), config, image, text)
    assert out.loss_text.item() < 1e-6 and out.loss_image.item() > 0.5
    epsilon = DiffusionConfig(timesteps="shared", p_drop_text=0, p_drop_image=0)
    assert diffusion_loss(KnowsTheCleanText(text), NoiseSchedule(epsilon), epsilon, image, text).loss_text > 0.5


def word_table(words: int = 12, dim: int = 16) -> torch.Tensor:
    """A vocabulary as TextCodec.table holds it: unit vectors times sqrt(dim)."""
    unit = torch.nn.functional.normalize(torch.randn(words, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    return unit * dim ** 0.5


def test_rounding_loss_is_the_cross_entropy_of_the_true_words_under_negative_half_squared_distances():
    table = word_table()
    ids = torch.randint(0, 12, (4, 16), generator=torch.Generator().manual_seed(1))
    estimate = table[ids] + 0.5 * torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(2))
    logits = -torch.cdist(estimate, table.expand(4, -1, -1)).pow(2) / 2
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)
    torch.testing.assert_close(rounding_loss(estimate, table[ids], table), expected, rtol=1e-4, atol=1e-4)
    assert rounding_loss(table[ids], table[ids], table).max() < 0.05  # the right words: sure
    assert rounding_loss(table[(ids + 1) % 12], table[ids], table).min() > 1  # the wrong ones
    blend = rounding_loss(table.mean(0).expand(4, 16, 16), table[ids], table)  # no word singled out: about log V
    assert (blend - torch.log(torch.tensor(12.0))).abs().max() < 1


@pytest.mark.parametrize("text_scale", [1.0, 2.0])
def test_the_rounding_term_reads_the_clean_text_estimate_in_the_data_scale(text_scale):
    model_config = preset("tiny")
    table = word_table(dim=model_config.word_dim)
    ids = torch.randint(0, 12, (8, model_config.text_len), generator=torch.Generator().manual_seed(3))
    image, text = torch.randn(8, *model_config.latent_shape), table[ids]
    config = DiffusionConfig(prediction="flow", weight_base="flow", snr_floor=None, min_snr_gamma=None,
                             text_target="sample", text_scale=text_scale, rounding_loss_weight=0.5,
                             timesteps="shared", p_drop_text=0, p_drop_image=0)
    out = diffusion_loss(KnowsTheCleanText(text * text_scale), NoiseSchedule(config), config, image, text,
                         vocabulary=table)
    assert out.loss_rounding.item() < 0.05
    torch.testing.assert_close(out.loss, out.loss_image + out.loss_text + 0.5 * out.loss_rounding)
    wrong = diffusion_loss(KnowsTheCleanText(table[(ids + 1) % 12] * text_scale), NoiseSchedule(config), config,
                           image, text, vocabulary=table)
    assert wrong.loss_rounding.item() > 1
    with pytest.raises(ValueError, match="rounding_loss_weight"):
        diffusion_loss(KnowsTheCleanText(text), NoiseSchedule(config), config, image, text)
    assert diffusion_loss(ZeroModel(), NoiseSchedule(DiffusionConfig()), DiffusionConfig(), image, text
                          ).loss_rounding is None


def test_a_training_step_with_the_rounding_term_trains_the_text_head_on_it():
    model_config = preset("tiny")
    table = word_table(dim=model_config.word_dim)
    ids = torch.randint(0, 12, (8, model_config.text_len), generator=torch.Generator().manual_seed(4))
    batch = {"latent": torch.randn(8, *model_config.latent_shape), "text": table[ids]}
    text_head_grads = {}
    for weight in (0.0, 1.0):  # the same weights, times and noise: only the term differs
        diffusion = DiffusionConfig(prediction="flow", weight_base="flow", snr_floor=None, min_snr_gamma=None,
                                    rounding_loss_weight=weight)
        torch.manual_seed(0)
        trainer = Trainer(PSUNet(model_config), OptimConfig(steps=2, batch_size=8), diffusion, torch.device("cpu"),
                          vocabulary=table)
        out, grad_norm, _ = trainer.step(0, [batch])
        text_head_grads[weight] = trainer.model.text_head.weight.grad.clone()
    assert out.loss_rounding.item() > 0 and torch.isfinite(grad_norm)
    torch.testing.assert_close(out.loss, out.loss_image + out.loss_text + out.loss_rounding)
    assert not torch.allclose(text_head_grads[0.0], text_head_grads[1.0])


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_runs_in_bf16_only_where_the_cpu_multiplies_bf16_in_hardware(monkeypatch, native):
    for query in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, query, lambda: native, raising=False)
    cpu = torch.device("cpu")
    assert native_bf16(cpu) is native
    assert not uses_bf16(OptimConfig(precision="auto"), cpu) and not uses_bf16(OptimConfig(precision="fp32"), cpu)
    if native:
        assert uses_bf16(OptimConfig(precision="bf16"), cpu)
        trainer = Trainer(PSUNet(preset("tiny")), OptimConfig(steps=2, precision="bf16"), DiffusionConfig(), cpu)
        image, text = batch(preset("tiny"), 4)
        out, grad_norm, _ = trainer.step(0, [{"latent": image, "text": text}])
        assert trainer.use_bf16 and torch.isfinite(out.loss) and torch.isfinite(grad_norm)
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # autocast: fp32 weights
    else:
        with pytest.warns(UserWarning, match="precision=bf16.*no native bf16.*fp32"):
            assert not uses_bf16(OptimConfig(precision="bf16"), cpu)


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
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def fixed_noise_loss():
        return diffusion_loss(model, schedule, config, image, text, torch.Generator().manual_seed(0)).loss

    with torch.no_grad():
        initial = fixed_noise_loss().item()
    for _ in range(100):  # falls ~170x
        optimizer.zero_grad()
        loss = fixed_noise_loss()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = fixed_noise_loss().item()
    assert final < initial / 10, (initial, final)
