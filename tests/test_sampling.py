"""Joint infilling sampler: known parts kept, 2 evaluations per step in one forward, determinism."""

import math

import pytest
import torch

from psunet.config import DiffusionConfig, preset
from psunet.model import PSUNet
from psunet.sampling import InfillRun, joint_infill, step_together

MODEL_CONFIG = preset("tiny")
DIFFUSION = DiffusionConfig()


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
@pytest.mark.parametrize("scheduler", ["dpmsolver++", "ddim", "ddpm"])
def test_known_parts_are_kept_exactly(model, scenario, scheduler):
    image, text = known_data()
    kwargs = SCENARIOS[scenario](image, text)
    out = joint_infill(model, MODEL_CONFIG, DIFFUSION, 2, steps=4, scheduler=scheduler, **kwargs)
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
                           seed=[11, 12, 13], guidance_scale=[3.0, 1.0, 5.0])
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
    (dict(seed=[1, 2, 3]), "seed"),
    (dict(guidance_scale=[1.0, math.nan]), "guidance_scale"),
])
def test_bad_sampler_input_names_the_field(model, kwargs, field):
    with pytest.raises(ValueError, match=field):
        joint_infill(model, MODEL_CONFIG, DIFFUSION, 2, **kwargs)


@pytest.mark.parametrize("independent", [False, True])
def test_a_fully_known_modality_is_clean_at_time_zero_only_for_independently_timed_models(model, independent):
    _, text = known_data(3)
    recording = RecordingModel(model)
    diffusion = DiffusionConfig(independent_timesteps=independent)
    joint_infill(recording, MODEL_CONFIG, diffusion, 3, text_known=text, guidance_scale=3.0, steps=4)
    assert len(recording.calls) == 4
    last = diffusion.num_train_timesteps - 1
    for text_in, times in recording.calls:
        image_times, text_times = times
        cond_text, unc_text = text_in.chunk(2)
        assert torch.equal(image_times[:3], image_times[3:]) and len(set(image_times.tolist())) == 1
        if independent:
            assert torch.equal(cond_text, text)  # clean, not re-noised
            assert text_times[:3].tolist() == [0] * 3 and text_times[3:].tolist() == [last] * 3
        else:
            assert not torch.allclose(cond_text, text)
            assert torch.equal(text_times, image_times)
    # a partly known modality is re-noised even for an independently timed model
    recording.calls.clear()
    half = half_masks(3)[1]
    joint_infill(recording, MODEL_CONFIG, diffusion, 3, text_known=text, text_mask=half, steps=4)
    cond_text = recording.calls[0][0].chunk(2)[0]
    assert not torch.allclose(cond_text[half.bool()], text[half.bool()])


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "ddim"])
def test_runs_at_different_steps_share_forwards_and_give_what_they_give_alone(model, scheduler):
    image, text = known_data(3)
    first = dict(text_known=text[:2], steps=4, seed=[1, 2], guidance_scale=[3.0, 5.0], scheduler=scheduler)
    second = dict(image_known=image[2:], steps=6, seed=7, scheduler=scheduler)  # image->text, another length
    third = dict(steps=3, seed=9, scheduler=scheduler)  # unconditional: one pass, no guidance
    alone = [joint_infill(model, MODEL_CONFIG, DIFFUSION, n, **kw) for n, kw in ((2, first), (1, second), (1, third))]
    recording = RecordingModel(model)
    runs = [InfillRun(MODEL_CONFIG, DIFFUSION, n, **kw) for n, kw in ((2, first), (1, second), (1, third))]
    step_together(recording, runs[:1])  # the first run is one step ahead when the others join
    while any(not run.done for run in runs):
        step_together(recording, [run for run in runs if not run.done])
    assert recording.batch_sizes == [4, 4 + 2 + 1, 4 + 2 + 1, 4 + 2 + 1, 2, 2, 2]
    joined = recording.calls[1][1][0]  # image times of the first shared forward: each run at its own step
    assert joined[:4].unique().numel() == 1 and bool((joined[4:] > joined[0]).all())
    for run, expected in zip(runs, alone):
        got = run.result()
        assert got.network_evaluations == expected.network_evaluations
        assert torch.allclose(got.image_latents, expected.image_latents, atol=1e-4)
        assert torch.allclose(got.text_vectors, expected.text_vectors, atol=1e-4)
    with pytest.raises(RuntimeError, match="done all its steps"):
        runs[0].inputs()
