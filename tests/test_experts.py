"""Expert denoisers (eDiff-I): interval splits, routing by time, save/load of an assembled ensemble, bad input."""

import json

import pytest
import torch

from psunet.checkpoint import save_weights
from psunet.model_folder import load_model
from psunet.config import DiffusionConfig, preset
from psunet.experts import ExpertEnsemble, binary_split, check_intervals, parse_intervals
from psunet.sampling import joint_infill

T = 1000


@pytest.mark.parametrize("count, expected", [
    (1, [(0, 1000)]),
    (2, [(0, 500), (500, 1000)]),
    (3, [(0, 500), (500, 750), (750, 1000)]),
    (4, [(0, 250), (250, 500), (500, 750), (750, 1000)]),
])
def test_binary_split_tiles_the_time_range_noisier_half_first(count, expected):
    assert binary_split(T, count) == expected
    assert check_intervals(expected, T) == expected


@pytest.mark.parametrize("intervals, message", [
    ([[0, 400], [450, 1000]], "gap: times 400..449"),
    ([[0, 600], [500, 1000]], "overlap: times 500..599"),
    ([[0, 500], [500, 900]], "cover [0, 1000)"),
    ([[100, 500], [500, 1000]], "cover [0, 1000)"),
    ([[0, 500], [500, 500], [500, 1000]], "start < end"),
    ([], "at least one expert"),
])
def test_bad_intervals_are_refused_with_the_times_named(intervals, message):
    with pytest.raises(ValueError, match="experts: ") as error:
        check_intervals(intervals, T)
    assert message in str(error.value)


@pytest.mark.parametrize("count", [0, -1, 2.5])
def test_fewer_than_one_expert_is_refused(count):
    with pytest.raises(ValueError, match="integer >= 1"):
        binary_split(T, count)


def test_command_line_intervals():
    assert parse_intervals("0:300,300:1000") == [[0, 300], [300, 1000]]
    with pytest.raises(ValueError, match="0:500,500:1000"):
        parse_intervals("0-300")


def distinct_ensemble(intervals):
    """An ensemble whose expert i predicts the constant i (its image head bias), so outputs name the expert."""
    ensemble = ExpertEnsemble(preset("tiny"), intervals).eval()
    for i, expert in enumerate(ensemble.experts):
        for p in expert.parameters():
            p.data.zero_()
        expert.image_conv.bias.data.fill_(float(i))
    return ensemble


def test_routing_picks_the_owner_of_every_time_including_boundaries():
    intervals = [(0, 250), (250, 600), (600, 1000)]
    ensemble = distinct_ensemble(intervals)
    times = torch.arange(T)
    index = ensemble.expert_index(times)
    expected = torch.tensor([next(i for i, (a, b) in enumerate(intervals) if a <= t < b) for t in range(T)])
    assert torch.equal(index, expected)
    assert index[249] == 0 and index[250] == 1 and index[599] == 1 and index[600] == 2 and index[999] == 2

    # a mixed batch: each sample gets its own expert's output
    times = torch.tensor([0, 249, 250, 599, 600, 999])
    c = ensemble.config
    out = ensemble(torch.randn(6, *c.latent_shape), torch.randn(6, c.text_len, c.word_dim), times)
    assert out.eps_image.shape == (6, *c.latent_shape)
    assert out.eps_image.mean(dim=(1, 2, 3)).tolist() == [0, 0, 1, 1, 2, 2]
    # (2, B) times with both rows equal route the same; different noise levels are refused
    out = ensemble(torch.randn(6, *c.latent_shape), torch.randn(6, c.text_len, c.word_dim), times.expand(2, -1))
    assert out.eps_image.mean(dim=(1, 2, 3)).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="independent"):
        ensemble(torch.randn(2, *c.latent_shape), torch.randn(2, c.text_len, c.word_dim), torch.tensor([[1, 2], [3, 4]]))
    # a modality given clean (time 0) or as pure noise (the last time) does not count: the other time routes
    pairs = torch.tensor([[300, 0, 999, 700], [0, 300, 700, 999]])
    out = ensemble(torch.randn(4, *c.latent_shape), torch.randn(4, c.text_len, c.word_dim), pairs)
    assert out.eps_image.mean(dim=(1, 2, 3)).tolist() == [1, 1, 2, 2]


def test_a_sampling_step_costs_one_expert_and_uses_the_right_one():
    ensemble = distinct_ensemble(binary_split(T, 2))
    calls = []
    for i, expert in enumerate(ensemble.experts):
        expert.register_forward_hook(lambda module, args, out, i=i: calls.append((i, int(args[2].flatten()[0]))))
    c = ensemble.config
    out = joint_infill(ensemble, c, DiffusionConfig(), 2, steps=6, scheduler="ddim", guidance_scale=1.0)
    assert out.network_evaluations == 6 and len(calls) == 6
    assert all(expert == (1 if t >= 500 else 0) for expert, t in calls)
    assert {expert for expert, _ in calls} == {0, 1}


def test_an_assembled_ensemble_saves_and_loads(tmp_path):
    ensemble = ExpertEnsemble(preset("tiny"), binary_split(T, 2)).eval()
    save_weights(tmp_path / "ema.safetensors", ensemble.state_dict())
    (tmp_path / "config.json").write_text(json.dumps({
        "model": ensemble.config.model_dump(), "diffusion": DiffusionConfig().model_dump(),
        "experts": {"intervals": [list(pair) for pair in ensemble.intervals]}}))
    loaded, model_config, _, config = load_model(tmp_path)
    assert isinstance(loaded, ExpertEnsemble) and loaded.intervals == [(0, 500), (500, 1000)]
    c = model_config
    args = (torch.randn(3, *c.latent_shape), torch.randn(3, c.text_len, c.word_dim), torch.tensor([10, 700, 999]))
    with torch.no_grad():
        assert torch.equal(loaded(*args).eps_image, ensemble(*args).eps_image)

    config["experts"]["intervals"] = [[0, 400], [500, 1000]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gap"):
        load_model(tmp_path)
