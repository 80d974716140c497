"""What a head predicts and how its error is weighted: the conversions between epsilon, v and the clean sample,
the loss weight stated on the clean-data error, a v model sampled like diffusers samples one, and an epsilon model
folder saved before v existed sampling exactly as it did."""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from pydantic import ValidationError
from safetensors.torch import load_file

from psunet.config import DiffusionConfig, preset
from psunet.diffusion import NoiseSchedule, clean_data_weight, loss_weight
from psunet.model import PSUNet
from psunet.model_folder import load_model
from psunet.sampling import joint_infill

TARGETS = ("epsilon", "v", "sample")
WEIGHTS = {  # name: (weight_base, snr_floor, min_snr_gamma)
    "none": ("snr", None, None), "min_snr": ("snr", None, 5.0), "floor": ("snr", 1.0, 5.0),
    "snr+1": ("snr+1", None, None), "snr+1_floor": ("snr+1", 0.5, 5.0)}
EPSILON_FOLDER = Path(__file__).parent / "fixtures" / "epsilon_model"


def known_input(config: DiffusionConfig, batch: int = 64):
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(batch, 4, 8, 8, generator=generator)
    noise = torch.randn(batch, 4, 8, 8, generator=generator)
    times = torch.linspace(0, config.num_train_timesteps - 1, batch).long()
    return clean, noise, times


@pytest.mark.parametrize("target, zero_terminal_snr", [(target, False) for target in TARGETS] +
                         [("v", True), ("sample", True)])  # epsilon cannot be zero-terminal (below)
def test_each_target_converts_back_to_the_true_noise_and_clean_data(target, zero_terminal_snr):
    config = DiffusionConfig(prediction="v", text_target=target, zero_terminal_snr=zero_terminal_snr)
    schedule = NoiseSchedule(config)
    clean, noise, times = known_input(config)
    noisy = schedule.add_noise(clean, noise, times)
    output = schedule.target_of(target, clean, noise, times)
    inner = slice(1, -1)  # epsilon from a clean prediction divides by sigma(0) ~ 0.03, x0 from epsilon by the signal
    torch.testing.assert_close(schedule.epsilon_of(target, output, noisy, times)[inner], noise[inner],
                               atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.clean_of(target, output, noisy, times)[inner], clean[inner],
                               atol=2e-4, rtol=1e-4)
    if target != "epsilon":  # at the last time too, also with no signal left at all
        torch.testing.assert_close(schedule.clean_of(target, output, noisy, times)[-1], clean[-1], atol=1e-4, rtol=0)
    if target == "v":  # v = sqrt(a) eps - sqrt(1 - a) x0, written out
        alpha_bar = schedule.alphas_cumprod[times].view(-1, 1, 1, 1)
        torch.testing.assert_close(output, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean)


@pytest.mark.parametrize("target", TARGETS)
def test_the_output_that_implies_given_clean_data_is_the_true_target(target):
    config = DiffusionConfig(prediction="v", text_target=target)
    schedule = NoiseSchedule(config)
    clean, noise, times = known_input(config)
    noisy = schedule.add_noise(clean, noise, times)
    output = schedule.output_of(target, clean, noisy, times)
    torch.testing.assert_close(output, schedule.target_of(target, clean, noise, times), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.clean_of(target, output, noisy, times), clean, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("target", TARGETS)
def test_a_weight_means_the_same_on_the_clean_data_whatever_the_target(target, weight):
    """The squared error of a prediction in its target's terms, times loss_weight, is the squared error of the clean
    data it implies times clean_data_weight: one set of terms for every recipe."""
    base, floor, cap = WEIGHTS[weight]
    config = DiffusionConfig(prediction="v", text_target=target, weight_base=base, snr_floor=floor, min_snr_gamma=cap)
    schedule = NoiseSchedule(config)
    clean, noise, times = known_input(config)
    noisy = schedule.add_noise(clean, noise, times)
    guess = clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))  # a wrong x0
    alpha_bar = schedule.alphas_cumprod[times].view(-1, 1, 1, 1)
    guess_noise = (noisy - alpha_bar.sqrt() * guess) / (1 - alpha_bar).sqrt()  # with `guess`: the same noisy input
    predicted = schedule.target_of(target, guess, guess_noise, times)
    snr = schedule.snr(times)
    in_target = (predicted - schedule.target_of(target, clean, noise, times)).pow(2).flatten(1).mean(1)
    on_clean = (guess - clean).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(in_target * loss_weight(config, target, snr), on_clean * clean_data_weight(config, snr),
                               rtol=2e-3, atol=1e-5)


def test_the_clean_data_weight_is_the_base_clamped_between_floor_and_cap():
    snr = torch.tensor([0.01, 0.5, 2.0, 100.0])
    floor = DiffusionConfig(snr_floor=1.0, min_snr_gamma=5.0)
    torch.testing.assert_close(clean_data_weight(floor, snr), torch.tensor([1.0, 1.0, 2.0, 5.0]))
    min_snr = DiffusionConfig(snr_floor=None, min_snr_gamma=5.0)
    torch.testing.assert_close(clean_data_weight(min_snr, snr), torch.tensor([0.01, 0.5, 2.0, 5.0]))
    plus_one = DiffusionConfig(weight_base="snr+1", snr_floor=None, min_snr_gamma=None)
    torch.testing.assert_close(clean_data_weight(plus_one, snr), snr + 1)
    # min-SNR-5 for v, as Hang et al. write it: min(SNR, 5) / (SNR + 1)
    torch.testing.assert_close(loss_weight(min_snr, "v", snr), torch.clamp(snr, max=5.0) / (snr + 1))


def test_zero_terminal_snr_needs_a_target_that_is_not_the_noise():
    with pytest.raises(ValidationError, match="zero_terminal_snr"):
        DiffusionConfig(prediction="epsilon", zero_terminal_snr=True)
    with pytest.raises(ValidationError, match="zero_terminal_snr"):
        DiffusionConfig(prediction="v", text_target="epsilon", zero_terminal_snr=True)
    last = torch.tensor([999])
    assert NoiseSchedule(DiffusionConfig(zero_terminal_snr=True)).snr(last).item() < 1e-6  # diffusers keeps 2^-24
    assert NoiseSchedule(DiffusionConfig()).snr(last).item() > 1e-3


def test_a_config_saved_before_the_prediction_field_is_an_epsilon_model():
    old = {key: value for key, value in DiffusionConfig().model_dump().items()
           if key not in ("prediction", "snr_floor", "weight_base", "zero_terminal_snr")}
    saved = DiffusionConfig.saved({**old, "min_snr_gamma": 5.0})
    assert (saved.prediction, saved.target("text"), saved.snr_floor, saved.min_snr_gamma) == ("epsilon", "epsilon",
                                                                                              None, 5.0)
    assert DiffusionConfig.saved(DiffusionConfig().model_dump()) == DiffusionConfig()


def diffusers_loop(model, scheduler, steps: int, image, text, times_of, out_field: str):
    """A plain diffusers sampling loop for one modality, the other given clean at time 0."""
    scheduler.set_timesteps(steps)
    x = image if out_field == "eps_image" else text
    for t in scheduler.timesteps:
        inputs = (x, text) if out_field == "eps_image" else (image, x)
        out = getattr(model(*inputs, times_of(t)), out_field)
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_the_sampler_with_a_v_model_agrees_with_a_plain_diffusers_v_prediction_loop(scheduler):
    torch.manual_seed(0)
    config, diffusion = preset("tiny"), DiffusionConfig(prediction="v")
    model = PSUNet(config).eval()
    batch, steps = 3, 8
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(batch, config.text_len, config.word_dim, generator=generator)
    image = torch.randn(batch, *config.latent_shape, generator=generator)
    kwargs = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="v_prediction", timestep_spacing="trailing")
    make = {"ddim": lambda: DDIMScheduler(**kwargs, set_alpha_to_one=False, clip_sample=False),
            "dpmsolver++": lambda: DPMSolverMultistepScheduler(**kwargs, algorithm_type="dpmsolver++",
                                                               solver_order=2)}[scheduler]
    settings = dict(steps=steps, scheduler=scheduler, guidance_scale=1.0, seed=5)
    noise = torch.Generator().manual_seed(5)  # the sampler's first draws: the image's noise, then the text's
    start_image = torch.randn(batch, *config.latent_shape, generator=noise)
    start_text = torch.randn(batch, config.text_len, config.word_dim, generator=noise)
    with torch.no_grad():
        ours = joint_infill(model, config, diffusion, batch, text_known=text, **settings).image_latents
        theirs = diffusers_loop(model, make(), steps, start_image, text,
                                lambda t: torch.stack([t.expand(batch), torch.zeros(batch, dtype=torch.long)]),
                                "eps_image")
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        ours = joint_infill(model, config, diffusion, batch, image_known=image, **settings).text_vectors
        theirs = diffusers_loop(model, make(), steps, image, start_text,
                                lambda t: torch.stack([torch.zeros(batch, dtype=torch.long), t.expand(batch)]),
                                "eps_text")
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_an_epsilon_model_saved_before_v_existed_samples_the_same_as_before():
    """tests/fixtures/epsilon_model: a tiny random model and its samples, written by the code of 1f3853d (before
    `prediction` existed; its config has no such field)."""
    model, config, diffusion, _ = load_model(EPSILON_FOLDER)
    assert diffusion.prediction == "epsilon" and diffusion.min_snr_gamma == 5.0
    expected = load_file(str(EPSILON_FOLDER / "expected.safetensors"))
    for scheduler in ("dpmsolver++", "ddim"):
        settings = dict(steps=6, scheduler=scheduler, guidance_scale=3.0, seed=2)
        t2i = joint_infill(model, config, diffusion, 2, text_known=expected["text_known"], **settings)
        i2t = joint_infill(model, config, diffusion, 2, image_known=expected["image_known"], **settings)
        torch.testing.assert_close(t2i.image_latents, expected[f"{scheduler}_t2i_image"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(i2t.text_vectors, expected[f"{scheduler}_i2t_text"], rtol=1e-5, atol=1e-5)
