"""Joint infilling sampler: known parts kept, 2 evaluations per step in one forward, determinism."""

import math

import pytest
import torch

from psunet.config import DiffusionConfig, preset
from psunet.model import PSUNet
from psunet.diffusion import NoiseSchedule
from psunet.model import ModelOutput
from psunet.sampling import InfillRun, joint_infill, step_together
from psunet.settings import SamplerSettings

MODEL_CONFIG = preset("tiny")
DIFFUSION = DiffusionConfig()
FLOW = DiffusionConfig(prediction="flow", text_shift=2.0)  # rectified flow, the text noisier than the image


def sampler(name: str) -> tuple[DiffusionConfig, str]:
    """(diffusion config, scheduler) of a test's scheduler name: flow-<scheduler> samples a flow model."""
    return (FLOW, name.removeprefix("flow-")) if name.startswith("flow-") else (DIFFUSION, name)


SCHEDULERS = ["dpmsolver++", "ddim", "ddpm", "flow-euler", "flow-dpmsolver++"]


class RecordingModel(torch.nn.Module):
    """Wraps a model and records the batch size, the text input and the times of every forward call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.batch_sizes, self.calls = [], []

    def forward(self, image, text, t):
        self.batch_sizes.append(image.shape[0])
        self.calls.append((text.clone(), t.clone()))
        return self.model(image, text, t)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PSUNet(MODEL_CONFIG).eval()


def known_data(batch=2):
    return torch.randn(batch, *MODEL_CONFIG.latent_shape), torch.randn(batch, MODEL_CONFIG.text_len, MODEL_CONFIG.word_dim)


def half_masks(batch=2):
    image_mask = torch.zeros(batch, 1, MODEL_CONFIG.latent_size, MODEL_CONFIG.latent_size)
    image_mask[..., : MODEL_CONFIG.latent_size // 2] = 1
    text_mask = torch.zeros(batch, MODEL_CONFIG.text_len)
    text_mask[:, ::2] = 1
    return image_mask, text_mask


SCENARIOS = {
    "text_to_image": lambda img, txt: dict(text_known=txt),
    "image_to_text": lambda img, txt: dict(image_known=img),
    "unconditional": lambda img, txt: dict(),
    "partial_both": lambda img, txt: dict(image_known=img, image_mask=half_masks()[0],
                                          text_known=txt, text_mask=half_masks()[1]),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_known_parts_are_kept_exactly(model, scenario, scheduler):
    image, text = known_data()
    kwargs = SCENARIOS[scenario](image, text)
    diffusion, scheduler = sampler(scheduler)
    out = joint_infill(model, MODEL_CONFIG, diffusion, 2, steps=4, scheduler=scheduler, **kwargs)
    assert out.image_latents.shape == image.shape and out.text_vectors.shape == text.shape
    assert torch.isfinite(out.image_latents).all() and torch.isfinite(out.text_vectors).all()
    side, length = MODEL_CONFIG.latent_size, MODEL_CONFIG.text_len
    image_mask = kwargs.get("image_mask", torch.full((2, 1, side, side), float("image_known" in kwargs)))
    text_mask = kwargs.get("text_mask", torch.full((2, length), float("text_known" in kwargs)))
    image_kept = image_mask.expand_as(image).bool()
    text_kept = text_mask[..., None].expand_as(text).bool()
    assert torch.equal(out.image_latents[image_kept], image[image_kept])
    assert torch.equal(out.text_vectors[text_kept], text[text_kept])
    # the unknown part was actually generated
    if (~image_kept).any():
        assert not torch.allclose(out.image_latents[~image_kept], image[~image_kept])


@pytest.mark.parametrize("scenario", ["text_to_image", "image_to_text", "partial_both"])
def test_guidance_is_one_batched_forward_with_two_evaluations_per_step(model, scenario):
    recording = RecordingModel(model)
    out = joint_infill(recording, MODEL_CONFIG, DIFFUSION, 3, steps=5, guidance_scale=4.0,
                       **SCENARIOS[scenario](*known_data(3)) if scenario != "partial_both" else
                       dict(image_known=known_data(3)[0], text_known=known_data(3)[1]))
    assert recording.batch_sizes == [6] * 5  # one forward per step, cond + uncond stacked
    assert out.network_evaluations == 10


@pytest.mark.parametrize("kwargs", [dict(guidance_scale=1.0, text_known=known_data(3)[1]), dict(guidance_scale=5.0)])
def test_one_evaluation_per_step_without_guidance(model, kwargs):
    recording = RecordingModel(model)
    out = joint_infill(recording, MODEL_CONFIG, DIFFUSION, 3, steps=5, **kwargs)
    assert recording.batch_sizes == [3] * 5 and out.network_evaluations == 5


def test_guidance_applies_only_on_its_interval_of_noise_levels(model):
    _, text = known_data()
    common = dict(text_known=text, steps=4, scheduler="ddim", seed=3)  # levels 0.999, 0.749, 0.499, 0.249
    unguided = joint_infill(model, MODEL_CONFIG, DIFFUSION, 2, guidance_scale=1.0, **common)
    guided = joint_infill(model, MODEL_CONFIG, DIFFUSION, 2, guidance_scale=5.0, **common)
    outside = joint_infill(model, MODEL_CONFIG, DIFFUSION, 2, guidance_scale=5.0, guidance_interval=(0.8, 0.9),
                           **common)
    middle = joint_infill(model, MODEL_CONFIG, DIFFUSION, 2, guidance_scale=5.0, guidance_interval=(0.3, 0.6),
                          **common)
    everywhere = joint_infill(model, MODEL_CONFIG, DIFFUSION, 2, guidance_scale=5.0, guidance_interval=(0, 1),
                              **common)
    torch.testing.assert_close(outside.image_latents, unguided.image_latents)  # no step in [0.8, 0.9]
    torch.testing.assert_close(everywhere.image_latents, guided.image_latents)
    assert not torch.allclose(middle.image_latents, guided.image_latents, atol=1e-3)
    assert not torch.allclose(middle.image_latents, unguided.image_latents, atol=1e-3)
    for bad in [(0.6, 0.3), (0.2, 1.5), (0.5, 0.5)]:
        with pytest.raises(ValueError, match="guidance_interval"):
            SamplerSettings(guidance_interval=bad)


def test_guidance_changes_the_result(model):
    _, text = known_data()
    a = joint_infill(model, MODEL_CONFIG, DIFFUSION, 2, text_known=text, guidance_scale=1.0, steps=4)
    b = joint_infill(model, MODEL_CONFIG, DIFFUSION, 2, text_known=text, guidance_scale=6.0, steps=4)
    assert not torch.allclose(a.image_latents, b.image_latents)


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "ddpm"])
def test_fixed_seed_gives_identical_output(model, scheduler):
    image, _ = known_data()
    runs = [joint_infill(model, MODEL_CONFIG, DIFFUSION, 2, image_known=image, steps=4, seed=seed, scheduler=scheduler)
            for seed in (7, 7, 8)]
    assert torch.equal(runs[0].text_vectors, runs[1].text_vectors)
    assert torch.equal(runs[0].image_latents, runs[1].image_latents)
    assert not torch.equal(runs[0].text_vectors, runs[2].text_vectors)


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "ddpm"])
def test_per_sample_seeds_and_guidance_match_samples_run_alone(model, scheduler):
    image, text = known_data(3)
    batched = joint_infill(model, MODEL_CONFIG, DIFFUSION, 3, text_known=text, steps=4, scheduler=scheduler,
                           seeds=[11, 12, 13], guidance_scales=[3.0, 1.0, 5.0])
    for i, (seed, scale) in enumerate([(11, 3.0), (12, 1.0), (13, 5.0)]):
        alone = joint_infill(model, MODEL_CONFIG, DIFFUSION, 1, text_known=text[i:i + 1], steps=4,
                             scheduler=scheduler, seed=seed, guidance_scale=scale)
        torch.testing.assert_close(batched.image_latents[i:i + 1], alone.image_latents, atol=1e-3, rtol=1e-3)


L, E, S = MODEL_CONFIG.text_len, MODEL_CONFIG.word_dim, MODEL_CONFIG.latent_size


@pytest.mark.parametrize("kwargs,field", [
    (dict(scheduler="euler-magic"), "scheduler"),
    (dict(guidance_scale=math.nan), "guidance_scale"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=math.inf), "guidance_scale"),
    (dict(steps=0), "steps"),
    (dict(steps=10**6), "steps"),
    (dict(image_known=torch.zeros(2, 4, S * 2, S * 2)), "image_known"),
    (dict(text_known=torch.zeros(2, L + 1, E)), "text_known"),
    (dict(image_known=torch.zeros(2, 4, S, S), image_mask=torch.ones(2, 1, S * 2, S * 2)), "image_mask"),
    (dict(text_known=torch.zeros(2, L, E), text_mask=torch.ones(2, L - 1)), "text_mask"),
    (dict(text_known=torch.zeros(2, L, E), text_mask=torch.full((2, L), 0.5)), "text_mask"),
    (dict(text_mask=torch.ones(2, L)), "text_known"),
    (dict(seeds=[1, 2, 3]), "seeds"),
    (dict(guidance_scales=[1.0, math.nan]), "guidance_scale"),
    (dict(guidance_scales=[(1.0, -2.0)]), "guidance_scale_text"),
    (dict(guidance_scale_image=-1.0), "guidance_scale_image"),
    (dict(spacing="sideways"), "spacing"),
    (dict(settings=SamplerSettings(), steps=4), "not both"),
])
def test_bad_sampler_input_names_the_field(model, kwargs, field):
    with pytest.raises(ValueError, match=field):
        joint_infill(model, MODEL_CONFIG, DIFFUSION, 2, **kwargs)


@pytest.mark.parametrize("timesteps", ["shared", "independent", "slices"])
def test_a_fully_known_modality_is_clean_at_time_zero_unless_times_are_shared(model, timesteps):
    _, text = known_data(3)
    recording = RecordingModel(model)
    diffusion = DiffusionConfig(timesteps=timesteps)
    joint_infill(recording, MODEL_CONFIG, diffusion, 3, text_known=text, guidance_scale=3.0, steps=4)
    assert len(recording.calls) == 4
    last = diffusion.num_train_timesteps - 1
    for text_in, times in recording.calls:
        image_times, text_times = times
        cond_text, unc_text = text_in.chunk(2)
        assert torch.equal(image_times[:3], image_times[3:]) and len(set(image_times.tolist())) == 1
        if timesteps != "shared":
            assert torch.equal(cond_text, text)  # clean, not re-noised
            assert text_times[:3].tolist() == [0] * 3 and text_times[3:].tolist() == [last] * 3
        else:
            assert not torch.allclose(cond_text, text)
            assert torch.equal(text_times, image_times)
    # a partly known modality is re-noised (on the diagonal) whatever the model learned
    recording.calls.clear()
    half = half_masks(3)[1]
    joint_infill(recording, MODEL_CONFIG, diffusion, 3, text_known=text, text_mask=half, steps=4)
    cond_text, times = recording.calls[0][0].chunk(2)[0], recording.calls[0][1]
    assert not torch.allclose(cond_text[half.bool()], text[half.bool()])
    assert torch.equal(times[0], times[1])


class GuidanceStub(torch.nn.Module):
    """eps = 1 on the conditional rows (the first half of a guided batch), 0 on the unconditional ones."""

    def forward(self, image, text, t):
        half = image.shape[0] // 2
        eps_image, eps_text = torch.zeros_like(image), torch.zeros_like(text)
        eps_image[:half], eps_text[:half] = 1.0, 1.0
        return ModelOutput(eps_image=eps_image, eps_text=eps_text)


def test_guidance_combines_conditional_and_unconditional_per_modality_and_sample(monkeypatch):
    image, text = known_data(2)
    image_mask, text_mask = half_masks(2)
    run = InfillRun(MODEL_CONFIG, DIFFUSION, 2, image_known=image, image_mask=image_mask, text_known=text,
                    text_mask=text_mask, steps=3, scheduler="ddim", guidance_scales=[(2.0, 5.0), (0.5, 3.0)])
    seen = {}
    for name in ("image", "text"):
        scheduler = getattr(run, f"{name}_scheduler")
        original = scheduler.step

        def spy(eps, t, sample, original=original, name=name, **kw):
            seen[name] = eps.clone()
            return original(eps, t, sample, **kw)
        monkeypatch.setattr(scheduler, "step", spy)
    step_together(GuidanceStub(), [run])
    # eps = eps_unc + w (eps_cond - eps_unc) = 0 + w (1 - 0) = w
    assert seen["image"][:, 0, 0, 0].tolist() == [2.0, 0.5] and seen["image"].flatten(1).std(1).max() == 0
    assert seen["text"][:, 0, 0].tolist() == [5.0, 3.0] and seen["text"].flatten(1).std(1).max() == 0


@pytest.mark.parametrize("timesteps", ["shared", "slices"])
@pytest.mark.parametrize("scenario", ["text_to_image", "image_to_text", "partial_both"])
def test_the_unconditional_input_does_not_depend_on_the_data(model, timesteps, scenario):
    diffusion = DiffusionConfig(timesteps=timesteps)
    inputs = []
    for scale in (1.0, -7.0):
        image, text = known_data(2)
        run = InfillRun(MODEL_CONFIG, diffusion, 2, guidance_scale=3.0, steps=4, seed=5,
                        **SCENARIOS[scenario](image * scale, text * scale))
        image_in, text_in, times, _ = run.inputs()
        inputs.append((image_in[2:], text_in[2:], times[:, 2:]))
        assert not torch.equal(image_in[:2], image_in[2:]) or not torch.equal(text_in[:2], text_in[2:])
    for first, second in zip(*inputs):
        assert torch.equal(first, second)


def test_a_renoised_known_part_has_the_current_steps_mean_and_variance():
    diffusion = DiffusionConfig(timesteps="shared", text_scale=2.0)
    schedule = NoiseSchedule(diffusion)
    batch, value = 64, 0.8
    text = torch.full((batch, MODEL_CONFIG.text_len, MODEL_CONFIG.word_dim), value)
    run = InfillRun(MODEL_CONFIG, diffusion, batch, text_known=text, guidance_scale=1.0, steps=5, scheduler="ddim")
    zeros = ModelOutput(eps_image=torch.zeros(batch, *MODEL_CONFIG.latent_shape), eps_text=torch.zeros_like(text))
    while not run.done:
        _, text_in, times, _ = run.inputs()
        alpha_bar = schedule.alphas_cumprod[times[1, 0]]
        assert abs(text_in.mean().item() - alpha_bar.sqrt().item() * value * 2.0) < 0.02
        assert abs(text_in.var().item() - (1 - alpha_bar).item()) < 0.03
        run.advance(zeros.eps_image, zeros.eps_text)


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "ddim", "flow-euler", "flow-dpmsolver++"])
def test_runs_at_different_steps_share_forwards_and_give_what_they_give_alone(model, scheduler):
    image, text = known_data(3)
    diffusion, scheduler = sampler(scheduler)
    first = dict(text_known=text[:2], steps=4, seeds=[1, 2], guidance_scales=[3.0, (5.0, 2.0)], scheduler=scheduler)
    second = dict(image_known=image[2:], steps=6, seed=7, scheduler=scheduler)  # image->text, another length
    third = dict(steps=3, seed=9, scheduler=scheduler)  # unconditional: one pass, no guidance
    alone = [joint_infill(model, MODEL_CONFIG, diffusion, n, **kw) for n, kw in ((2, first), (1, second), (1, third))]
    recording = RecordingModel(model)
    runs = [InfillRun(MODEL_CONFIG, diffusion, n, **kw) for n, kw in ((2, first), (1, second), (1, third))]
    step_together(recording, runs[:1])  # the first run is one step ahead when the others join
    while any(not run.done for run in runs):
        step_together(recording, [run for run in runs if not run.done])
    assert recording.batch_sizes == [4, 4 + 2 + 1, 4 + 2 + 1, 4 + 2 + 1, 2, 2, 2]
    times = recording.calls[1][1]  # the first shared forward: each run at its own step (noise level)
    first_run, second_run, third_run = times[0, :4], times[1, 4:6], times[0, 6:]  # t2i, i2t, unconditional
    assert first_run.unique().numel() == 1
    assert bool((second_run > first_run[0]).all()) and bool((third_run > first_run[0]).all())
    for run, expected in zip(runs, alone):
        got = run.result()
        assert got.network_evaluations == expected.network_evaluations
        assert torch.allclose(got.image_latents, expected.image_latents, atol=1e-4)
        assert torch.allclose(got.text_vectors, expected.text_vectors, atol=1e-4)
    with pytest.raises(RuntimeError, match="done all its steps"):
        runs[0].inputs()


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "ddim", "ddpm"])
def test_sampling_starts_at_the_last_training_time_where_training_made_the_data_pure_noise(scheduler):
    """Trailing spacing (the default) starts at T - 1, the time a dropped modality is trained at; diffusers'
    leading spacing of DDIM and DDPM would start at 950 of 1000 with 20 steps."""
    run = InfillRun(MODEL_CONFIG, DIFFUSION, 1, steps=20, scheduler=scheduler)
    assert SamplerSettings().spacing == "trailing"
    assert int(run.image_scheduler.timesteps[0]) == DIFFUSION.num_train_timesteps - 1
    leading = InfillRun(MODEL_CONFIG, DIFFUSION, 1, steps=20, scheduler=scheduler, spacing="leading")
    assert int(leading.image_scheduler.timesteps[0]) < DIFFUSION.num_train_timesteps - 1


class PredictsCleanText(torch.nn.Module):
    """A text head that predicts fixed clean word vectors (text_target "sample"); no image noise."""

    def __init__(self, clean):
        super().__init__()
        self.clean = clean

    def forward(self, image, text, t):
        return ModelOutput(eps_image=torch.zeros_like(image), eps_text=self.clean.expand_as(text))


def test_a_clean_text_prediction_drives_the_sampler_to_those_vectors():
    clean = torch.randn(1, MODEL_CONFIG.text_len, MODEL_CONFIG.word_dim)
    image, _ = known_data(2)
    diffusion = DiffusionConfig(text_target="sample")
    out = joint_infill(PredictsCleanText(clean), MODEL_CONFIG, diffusion, 2, image_known=image, steps=10,
                       scheduler="ddim")
    assert (out.text_vectors - clean).abs().max() < 0.15


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_dropping_samples_mid_run_leaves_the_others_as_they_are_alone(model, scheduler):
    image, text = known_data(3)
    diffusion, scheduler = sampler(scheduler)
    kwargs = dict(text_known=text, steps=5, seeds=[1, 2, 3], guidance_scales=[3.0, 1.0, (5.0, 2.0)],
                  scheduler=scheduler)
    run = InfillRun(MODEL_CONFIG, diffusion, 3, **kwargs)
    step_together(model, [run])
    step_together(model, [run])
    run.keep([0, 2])  # the second sample's request is gone
    recording = RecordingModel(model)
    while not run.done:
        step_together(recording, [run])
    assert recording.batch_sizes == [4, 4, 4]  # its rows left the forwards
    kept = run.result()
    alone = joint_infill(model, MODEL_CONFIG, diffusion, 2, text_known=text[[0, 2]], steps=5, seeds=[1, 3],
                         guidance_scales=[3.0, (5.0, 2.0)], scheduler=scheduler)
    torch.testing.assert_close(kept.image_latents, alone.image_latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kept.text_vectors, alone.text_vectors, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="increasing sample indices"):
        run.keep([1, 0])
    shared = InfillRun(MODEL_CONFIG, diffusion, 2, text_known=text[:2], steps=2, seed=4)
    with pytest.raises(ValueError, match="give a seed per sample"):
        shared.keep([0])


def test_whether_a_modality_is_given_clean_is_decided_per_sample(model):
    _, text = known_data(2)
    diffusion = DiffusionConfig(timesteps="slices")
    partial = torch.ones(2, MODEL_CONFIG.text_len)
    partial[1, 3] = 0  # the second caption has a blank: re-noised; the first stays clean
    recording = RecordingModel(model)
    together = joint_infill(recording, MODEL_CONFIG, diffusion, 2, text_known=text, text_mask=partial, steps=3,
                            seeds=[5, 6])
    _, times = recording.calls[0]
    assert times[1, 0] == 0 and times[1, 1] == times[0, 1]  # conditional pass: clean at 0, re-noised at t
    alone = joint_infill(model, MODEL_CONFIG, diffusion, 1, text_known=text[:1], steps=3, seeds=[5])
    torch.testing.assert_close(together.image_latents[:1], alone.image_latents, atol=1e-4, rtol=1e-4)


def test_the_estimate_is_the_clean_prediction_and_ends_at_the_result(model):
    _, text = known_data(2)
    run = InfillRun(MODEL_CONFIG, DIFFUSION, 2, text_known=text, steps=4, seeds=[1, 2], scheduler="ddim")
    first = run.estimate()
    torch.testing.assert_close(first.text_vectors, text)  # known parts pasted back, even before a step
    errors = []
    while not run.done:
        step_together(model, [run])
        errors.append(float((run.estimate().image_latents - run.result().image_latents).abs().mean()))
    assert errors[-1] < errors[0] / 20  # DDIM's last step lands next to its x0 prediction (alpha_bar_0 < 1)


WORDS = torch.randn(12, MODEL_CONFIG.word_dim, generator=torch.Generator().manual_seed(3))
VOCABULARY = torch.nn.functional.normalize(WORDS, dim=-1) * MODEL_CONFIG.word_dim**0.5  # as TextCodec.table


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("scenario", ["image_to_text", "unconditional", "partial_both"])
def test_clamped_text_ends_on_vocabulary_words_and_keeps_the_known_words(model, scheduler, scenario):
    image, text = known_data()
    diffusion, scheduler = sampler(scheduler)
    known = SCENARIOS[scenario](image, text)
    out = joint_infill(model, MODEL_CONFIG, diffusion, 2, **known, steps=6, scheduler=scheduler, clamp_text=True,
                       vocabulary=VOCABULARY)
    free = torch.ones(2, MODEL_CONFIG.text_len, dtype=torch.bool) if "text_mask" not in known else \
        known["text_mask"] == 0
    distance = torch.cdist(out.text_vectors[free], VOCABULARY).min(-1).values
    assert distance.max() < 1e-2  # every sampled word is one of the vocabulary's vectors (norm 4, float error)
    if "text_mask" in known:
        torch.testing.assert_close(out.text_vectors[~free], text[~free])
    unclamped = joint_infill(model, MODEL_CONFIG, diffusion, 2, **known, steps=6, scheduler=scheduler)
    assert torch.cdist(unclamped.text_vectors[free], VOCABULARY).min(-1).values.min() > 0.1


def test_clamping_without_a_vocabulary_is_refused(model):
    with pytest.raises(ValueError, match="clamp_text needs the vocabulary"):
        InfillRun(MODEL_CONFIG, DIFFUSION, 1, clamp_text=True)
