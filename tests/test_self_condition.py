"""Self-conditioning (ModelConfig.self_condition): the model's input, what training gives it, what the sampler gives
it."""

import pytest
import torch

from psunet.config import DiffusionConfig, preset
from psunet.diffusion import NoiseSchedule, diffusion_loss
from psunet.model import PSUNet
from psunet.sampling import InfillRun, joint_infill, step_together

CONFIG = preset("tiny").model_copy(update={"self_condition": True})
FLOW = DiffusionConfig(prediction="flow", weight_base="flow", snr_floor=None, min_snr_gamma=None, text_shift=2.0,
                       text_scale=2.0)


class Recording(torch.nn.Module):
    """A model that records each call's inputs, estimate, outputs and whether gradients were on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, image, text, times, estimate=None):
        out = self.model(image, text, times, estimate=estimate)
        self.calls.append(dict(image=image.detach().clone(), text=text.detach().clone(), times=times.clone(),
                               estimate=estimate, out=out, grad=torch.is_grad_enabled()))
        return out


def data(batch):
    return torch.randn(batch, *CONFIG.latent_shape), torch.randn(batch, CONFIG.text_len, CONFIG.word_dim)


def test_a_self_conditioned_model_starts_as_the_plain_one_then_reads_the_estimate_and_checks_it():
    torch.manual_seed(0)
    model = PSUNet(CONFIG).eval()
    image, text = data(3)
    times = torch.tensor([100, 500, 900])
    without = model(image, text, times)
    given = model(image, text, times, estimate=data(3))
    assert torch.equal(without.eps_image, given.eps_image) and torch.equal(without.eps_text, given.eps_text)
    with torch.no_grad():
        model.text_estimate_in.weight.normal_()
    assert not torch.allclose(model(image, text, times, estimate=data(3)).eps_text, without.eps_text, atol=1e-3)
    assert model.image_estimate_in.bias is None  # no estimate adds exactly nothing
    with pytest.raises(ValueError, match="estimate: expected the inputs' shapes"):
        model(image, text, times, estimate=data(2))
    with pytest.raises(ValueError, match="model.self_condition is false"):
        PSUNet(preset("tiny"))(image, text, times, estimate=data(3))


def test_training_gives_half_the_samples_the_models_own_first_estimate_and_the_data_where_it_is_given_clean():
    torch.manual_seed(0)
    model = Recording(PSUNet(CONFIG))
    schedule, batch = NoiseSchedule(FLOW), 256
    image, text = data(batch)
    diffusion_loss(model, schedule, FLOW, image, text, generator=torch.Generator().manual_seed(1))
    first, second = model.calls
    assert not first["grad"] and second["grad"]
    assert 0.35 * batch < len(first["text"]) < 0.65 * batch
    estimate_image, estimate_text = second["estimate"]
    t_image, t_text = second["times"]
    last = schedule.num_timesteps - 1
    given = t_text == 0  # the text given clean: its estimate is the text as the model sees it (scaled)
    assert given.any() and torch.equal(estimate_text[given], text[given] * FLOW.text_scale)
    dropped = t_text == last  # pure noise in place of the text: no estimate, as the sampler's unconditional pass
    assert dropped.any() and bool((estimate_text[dropped] == 0).all())
    in_first = torch.tensor([any(torch.equal(row, seen) for seen in first["text"]) for row in second["text"]])
    rest = ~given & ~dropped
    assert bool((estimate_text[rest & ~in_first] == 0).all())
    guessed = rest & in_first
    rows = [int(i) for i in guessed.nonzero().flatten()]
    first_rows = [next(j for j, seen in enumerate(first["text"]) if torch.equal(second["text"][i], seen))
                  for i in rows]
    expected = schedule.clean_of("flow", first["out"].eps_text[first_rows], first["text"][first_rows],
                                 first["times"][1, first_rows])
    assert len(rows) > 0.25 * batch and torch.allclose(estimate_text[guessed], expected)
    clean_image = t_image == 0
    assert torch.equal(estimate_image[clean_image & (t_text != last)], image[clean_image & (t_text != last)])


def test_the_sampler_gives_the_previous_steps_estimate_with_the_known_part_as_given_and_none_unconditionally():
    torch.manual_seed(0)
    model = Recording(PSUNet(CONFIG).eval())
    image, text = data(2)
    run = InfillRun(CONFIG, FLOW, 2, text_known=text, guidance_scale=3.0, steps=3, seed=4)
    step_together(model, [run])
    seen_image, seen_text = run.estimate_image.clone(), run.estimate_text.clone()
    step_together(model, [run])
    (image_0, text_0), (image_1, text_1) = (call["estimate"] for call in model.calls)
    assert bool((image_0 == 0).all())  # nothing estimated before the first step
    known = text * FLOW.text_scale
    for text_in in (text_0, text_1):  # conditional rows: the caption as given; unconditional rows: none
        assert torch.equal(text_in[:2], known) and bool((text_in[2:] == 0).all())
    assert torch.equal(image_1[:2], seen_image) and torch.equal(image_1[2:], seen_image)
    assert not torch.equal(seen_text, known)  # the run's own estimate of the known text is not what it is given


def test_self_conditioned_runs_sharing_forwards_give_what_they_give_alone():
    torch.manual_seed(0)
    model = PSUNet(CONFIG).eval()
    with torch.no_grad():  # an estimate that matters
        model.image_estimate_in.weight.normal_(std=0.1)
        model.text_estimate_in.weight.normal_(std=0.1)
    image, text = data(2)
    first = dict(text_known=text, steps=4, seeds=[1, 2], guidance_scale=3.0)
    second = dict(image_known=image[:1], steps=3, seed=7, guidance_scale=5.0)
    alone = [joint_infill(model, CONFIG, FLOW, n, **kw) for n, kw in ((2, first), (1, second))]
    runs = [InfillRun(CONFIG, FLOW, n, **kw) for n, kw in ((2, first), (1, second))]
    step_together(model, runs[:1])
    while any(not run.done for run in runs):
        step_together(model, [run for run in runs if not run.done])
    for run, expected in zip(runs, alone):
        assert torch.allclose(run.result().image_latents, expected.image_latents, atol=1e-4)
        assert torch.allclose(run.result().text_vectors, expected.text_vectors, atol=1e-4)
