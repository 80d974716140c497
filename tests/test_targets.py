"""What a head predicts and how its error is weighted: the conversions between epsilon, v, the clean sample and the
flow velocity, the loss weight stated on the clean-data error, v and flow models sampled like diffusers samples
them, a flow model's logit-normal times and per-modality shift, and an epsilon model folder saved before v existed
sampling exactly as it did."""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from pydantic import ValidationError
from safetensors.torch import load_file

from psunet.config import DiffusionConfig, preset
from psunet.diffusion import NoiseSchedule, clean_data_weight, diffusion_loss, loss_weight, make_scheduler
from psunet.model import ModelOutput, PSUNet
from psunet.model_folder import load_model
from psunet.sampling import InfillRun, joint_infill, step_together
from psunet.settings import SamplerSettings

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
        # float32 through 6 guided steps: a change of machine or library moves the last digits (1.7e-5 seen)
        torch.testing.assert_close(t2i.image_latents, expected[f"{scheduler}_t2i_image"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(i2t.text_vectors, expected[f"{scheduler}_i2t_text"], rtol=1e-4, atol=1e-4)


FLOW = DiffusionConfig(prediction="flow", weight_base="flow", snr_floor=None, min_snr_gamma=None)  # SD3's loss


def test_the_flow_process_mixes_data_and_noise_linearly_and_its_target_is_the_velocity():
    schedule = NoiseSchedule(FLOW)
    clean, noise, times = known_input(FLOW)
    level = (times.float() / FLOW.num_train_timesteps).view(-1, 1, 1, 1)
    noisy = schedule.add_noise(clean, noise, times)
    torch.testing.assert_close(noisy, (1 - level) * clean + level * noise)
    velocity = schedule.target_of("flow", clean, noise, times)
    torch.testing.assert_close(velocity, noise - clean)
    torch.testing.assert_close(schedule.clean_of("flow", velocity, noisy, times), clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(schedule.epsilon_of("flow", velocity, noisy, times), noise, atol=1e-5, rtol=1e-5)
    moving = slice(1, None)  # at s = 0 the input is the clean data and implies no noise
    torch.testing.assert_close(schedule.output_of("flow", clean, noisy, times)[moving], velocity[moving],
                               atol=2e-4, rtol=1e-4)
    sample = schedule.output_of("flow", schedule.clean_of("sample", clean, noisy, times), noisy, times)
    torch.testing.assert_close(sample[moving], velocity[moving], atol=2e-4, rtol=1e-4)  # a clean-text head's


def test_a_plain_velocity_loss_is_the_flow_weight_on_the_clean_data():
    schedule = NoiseSchedule(FLOW)
    clean, noise, times = known_input(FLOW)
    times = times[1:]  # s > 0
    clean, noise = clean[1:], noise[1:]
    level = (times.float() / FLOW.num_train_timesteps).view(-1, 1, 1, 1)
    noisy = schedule.add_noise(clean, noise, times)
    guess = clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    guess_noise = (noisy - (1 - level) * guess) / level
    in_velocity = (schedule.target_of("flow", guess, guess_noise, times) - (noise - clean)).pow(2).flatten(1).mean(1)
    on_clean = (guess - clean).pow(2).flatten(1).mean(1)
    snr = schedule.snr(times)
    torch.testing.assert_close(loss_weight(FLOW, "flow", snr), torch.ones_like(snr), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(in_velocity, on_clean * clean_data_weight(FLOW, snr), rtol=2e-3, atol=1e-5)


def test_flow_times_are_logit_normal_and_the_text_is_shifted_to_more_noise():
    schedule = NoiseSchedule(FLOW)
    generator = torch.Generator().manual_seed(0)
    times = schedule.draw_times(20000, 0, 1000, "cpu", generator)
    assert 0 < times.min() and times.max() < 1000
    assert abs(times.median().item() - 500) < 10  # sigmoid(N(0, 1)) has median 1/2
    assert 0.60 < ((times > 250) & (times < 750)).float().mean().item() < 0.75  # more in the middle than uniform
    noisier = NoiseSchedule(FLOW.model_copy(update={"time_mean": 1.0}))
    assert abs(noisier.draw_times(20000, 0, 1000, "cpu", generator).median().item() - 731) < 10  # 1000 sigmoid(1)
    assert bool(((lambda t: (t >= 200) & (t < 300))(schedule.draw_times(1000, 200, 300, "cpu", generator))).all())
    shifted = NoiseSchedule(FLOW.model_copy(update={"text_shift": 3.0}))
    torch.testing.assert_close(shifted.text_time(torch.tensor([0.0, 250.0, 500.0, 1000.0])),
                               torch.tensor([0.0, 500.0, 750.0, 1000.0]))
    assert torch.equal(schedule.text_time(torch.tensor([250.0])), torch.tensor([250.0]))


class RecordsTimes(torch.nn.Module):
    def forward(self, image, text, times):
        self.times = times
        return ModelOutput(eps_image=torch.zeros_like(image), eps_text=torch.zeros_like(text))


def test_training_noises_the_text_at_the_shifted_time_of_the_image():
    config = FLOW.model_copy(update={"text_shift": 3.0, "timesteps": "shared", "p_drop_text": 0.0,
                                     "p_drop_image": 0.0})
    model, generator = RecordsTimes(), torch.Generator().manual_seed(0)
    diffusion_loss(model, NoiseSchedule(config), config, torch.randn(64, 4, 8, 8), torch.randn(64, 16, 16), generator)
    image_time, text_time = model.times
    torch.testing.assert_close(text_time, NoiseSchedule(config).text_time(image_time))
    assert bool((text_time > image_time).all())


def test_flow_settings_are_refused_where_they_mean_nothing():
    with pytest.raises(ValidationError, match="text_target"):
        DiffusionConfig(prediction="flow", text_target="v")
    with pytest.raises(ValidationError, match="text_target"):
        DiffusionConfig(prediction="v", text_target="flow")
    with pytest.raises(ValidationError, match="text_shift"):
        DiffusionConfig(prediction="v", text_shift=2.0)
    with pytest.raises(ValidationError, match="zero_terminal_snr"):
        DiffusionConfig(prediction="flow", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="cannot sample a flow model"):
        make_scheduler("ddim", FLOW)
    with pytest.raises(ValueError, match="samples flow models only"):
        make_scheduler("euler", DiffusionConfig())


@pytest.mark.parametrize("scheduler", ["euler", "dpmsolver++"])
def test_the_sampler_with_a_flow_model_agrees_with_a_plain_diffusers_flow_loop(scheduler):
    """Text->image and image->text against diffusers' own flow schedulers stepped by hand (the text too: text_eta
    0); the text's scheduler shifted by text_shift."""
    torch.manual_seed(0)
    config, diffusion = preset("tiny"), FLOW.model_copy(update={"text_shift": 2.0})
    model = PSUNet(config).eval()
    batch, steps = 3, 8
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(batch, config.text_len, config.word_dim, generator=generator)
    image = torch.randn(batch, *config.latent_shape, generator=generator)
    make = {"euler": lambda shift: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
            "dpmsolver++": lambda shift: DPMSolverMultistepScheduler(
                num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
                algorithm_type="dpmsolver++", solver_order=2)}[scheduler]
    settings = dict(steps=steps, scheduler=scheduler, guidance_scale=1.0, seed=5, text_eta=0.0)
    noise = torch.Generator().manual_seed(5)  # the sampler's first draws: the image's noise, then the text's
    start_image = torch.randn(batch, *config.latent_shape, generator=noise)
    start_text = torch.randn(batch, config.text_len, config.word_dim, generator=noise)
    zero = torch.zeros(batch)
    with torch.no_grad():
        ours = joint_infill(model, config, diffusion, batch, text_known=text, **settings).image_latents
        theirs = diffusers_loop(model, make(1.0), steps, start_image, text,
                                lambda t: torch.stack([t.expand(batch), zero]), "eps_image")
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        ours = joint_infill(model, config, diffusion, batch, image_known=image, **settings).text_vectors
        theirs = diffusers_loop(model, make(2.0), steps, image, start_text,
                                lambda t: torch.stack([zero, t.expand(batch)]), "eps_text")
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    run = InfillRun(config, diffusion, 1, steps=steps, scheduler=scheduler)
    image_times, text_times = run.image_scheduler.timesteps, run.text_scheduler.timesteps
    assert bool((text_times[1:] > image_times[1:]).all())  # at every step after the first the text is noisier


@pytest.mark.parametrize("eta", [0.6, 1.0])
def test_a_flow_model_s_text_steps_to_its_clean_estimate_noised_with_fresh_and_implied_noise(eta):
    """One image->text step with text_eta: x = (1 - s) x0 + s (sqrt(1 - eta^2) n_implied + eta n_fresh) at the next
    level s, the fresh noise the row's own next draw; text->image rows draw none, so their images do not depend
    on it. Outside [0, 1] it is refused, naming the field."""
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="text_eta"):
            SamplerSettings(text_eta=bad)
    torch.manual_seed(0)
    config, diffusion = preset("tiny"), FLOW.model_copy(update={"text_shift": 2.0})
    model = PSUNet(config).eval()
    seeds = [3, 4]
    image = torch.randn(2, *config.latent_shape)
    run = InfillRun(config, diffusion, 2, image_known=image, steps=4, guidance_scale=1.0, seeds=seeds, text_eta=eta)
    start = run.text.clone()
    step_together(model, [run])
    draws = [torch.Generator().manual_seed(seed) for seed in seeds]
    text_shape, image_shape = (1, config.text_len, config.word_dim), (1, *config.latent_shape)
    for generator in draws:  # the draws before: the starting image and text, then the step's known-text re-noising
        for shape in (image_shape, text_shape, text_shape, image_shape, text_shape):  # and unconditional inputs
            torch.randn(shape, generator=generator)
    fresh = torch.cat([torch.randn(text_shape, generator=g) for g in draws])
    now, after = (float(level) for level in run.text_scheduler.sigmas[:2])
    assert 0 < after < now < 1
    implied = (start - (1 - now) * run.estimate_text) / now
    expected = (1 - after) * run.estimate_text + after * ((1 - eta**2) ** 0.5 * implied + eta * fresh)
    torch.testing.assert_close(run.text, expected, atol=1e-5, rtol=1e-5)

    text = torch.randn(2, config.text_len, config.word_dim)
    with torch.no_grad():
        images = [joint_infill(model, config, diffusion, 2, text_known=text, steps=4, seeds=seeds,
                               text_eta=value).image_latents for value in (0.0, eta)]
    torch.testing.assert_close(images[0], images[1], atol=0, rtol=0)
