"""The cost columns of `benchmark.py convergence` (jobs/bench/convergence.py) come from the models themselves, and
the reach/spread arithmetic that turns curves into "who gets there first" is right. No timing: values and shapes
only."""

import math

import pytest
import torch

from jobs.bench.common import first_reach, spread
from jobs.bench.convergence import axes_at, backbone_configs, equal_flops_baseline, reach_table, training_memory_mb
from jobs.config import load_config
from psunet.config import baseline_of, preset
from psunet.model import PSUNet, forward_flops

CPU = torch.device("cpu")


def _baseline(depth: int):
    return preset("tiny").model_copy(update={"n_text": 0, "n_image": 0, "shared_depth": depth, "width": 64})


def test_flops_grow_with_the_blocks_a_model_has():
    flops = {depth: forward_flops(PSUNet(_baseline(depth))) for depth in (3, 7, 11)}
    per_block = (flops[7] - flops[3]) / 4
    assert flops[11] - flops[7] == pytest.approx(4 * per_block, rel=1e-6)  # each block costs the same
    assert per_block > 0 and flops[3] > 3 * per_block  # embeddings and heads come on top
    assert flops[7] / flops[3] == pytest.approx((flops[3] + 4 * per_block) / flops[3])


def test_training_memory_counts_activations_per_sample_and_five_copies_of_the_weights():
    model = PSUNet(preset("tiny"))
    four, eight = (training_memory_mb(model, batch, CPU) for batch in (4, 8))
    assert eight["activation_mb"] == pytest.approx(2 * four["activation_mb"], rel=0.02)
    parameters = sum(p.numel() for p in model.parameters())
    assert four["state_mb"] == pytest.approx(5 * 4 * parameters / 2**20)
    assert four["training_memory_mb"] == pytest.approx(four["activation_mb"] + four["state_mb"])
    twice = PSUNet(preset("tiny").model_copy(update={"shared_depth": 3}))
    assert training_memory_mb(twice, 4, CPU)["activation_mb"] > four["activation_mb"]


def test_the_equal_flops_baseline_is_all_shared_and_as_costly_as_psunet():
    config = preset("demo")
    narrow = equal_flops_baseline(config)
    assert (narrow.n_text, narrow.n_image, narrow.shared_depth) == (0, 0, baseline_of(config).shared_depth)
    assert forward_flops(PSUNet(narrow)) == pytest.approx(forward_flops(PSUNet(config)), rel=0.05)
    assert forward_flops(PSUNet(baseline_of(config))) > 1.3 * forward_flops(PSUNet(config))
    assert narrow.width < config.width and narrow.width % narrow.heads == 0


def test_psunet_at_the_baselines_memory_gets_the_bigger_batch_that_fills_it():
    base = load_config("configs/demo.yaml")
    configs = backbone_configs(base, ["psunet", "baseline", "psunet_memory"])
    batch = configs["psunet_memory"].optim.batch_size
    assert batch > base.optim.batch_size and configs["psunet_memory"].model == base.model
    memory = {name: training_memory_mb(PSUNet(cfg.model), cfg.optim.batch_size, CPU)["activation_mb"]
              for name, cfg in configs.items()}
    per_sample = memory["psunet"] / base.optim.batch_size
    assert abs(memory["psunet_memory"] - memory["baseline"]) <= per_sample
    with pytest.raises(ValueError, match="unknown \\['dit'\\]"):
        backbone_configs(base, ["psunet", "dit"])


def test_first_reach_interpolates_either_way_and_says_never():
    falling = [(10, 4.0), (20, 2.0), (30, 1.0)]
    assert first_reach(falling, 3.0) == 15.0
    assert first_reach(falling, 5.0) == 10.0
    assert first_reach(falling, 0.5) == math.inf
    rising = [(10, 0.2), (20, 0.6)]
    assert first_reach(rising, 0.4, higher_is_better=True) == 15.0
    assert first_reach(rising, 0.7, higher_is_better=True) == math.inf


def test_reach_table_targets_the_worst_final_value_on_every_axis():
    costs = {"fast": {"batch_size": 2, "train_flops_per_sample": 10, "seconds_per_step": 1.0},
             "slow": {"batch_size": 2, "train_flops_per_sample": 30, "seconds_per_step": 2.0}}
    values = {"fast": [3.0, 1.0], "slow": [4.0, 2.0]}
    runs = {name: [{"step": step, "val_loss": value, **axes_at(step, costs[name])}
                   for step, value in zip((10, 20), values[name])] for name in costs}
    table = reach_table(runs)["val_loss"]
    assert table["target"] == 2.0
    assert table["step"] == {"fast": 15.0, "slow": 20.0}
    assert table["train_flops"] == {"fast": 15 * 2 * 10, "slow": 20 * 2 * 30}
    assert table["seconds"] == {"fast": 15.0, "slow": 40.0}
    assert "t2i_accuracy" not in reach_table(runs)  # no accuracy points, no row


def test_spread_over_seeds():
    assert spread([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "min": 1.0, "max": 3.0}
    assert spread([5.0])["std"] == 0.0
    never = spread([1.0, math.inf])
    assert never["mean"] == math.inf and never["never"] == 1
