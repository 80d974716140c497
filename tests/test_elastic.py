"""Elastic training's pieces without a cluster: the worker range in the config, how a step's global batch is
shared out over workers and micro-batches, the sample stream that cuts batches to size, gradient accumulation
that gives the same update as one big batch, and the validation task's Ray resources."""

import pytest
import torch

import psunet.training
from jobs.config import load_config, worker_range
from jobs.training_run import SampleStream, task_resources
from psunet.diffusion import LossOutput
from psunet.model import PSUNet
from psunet.training import Trainer, rank_split

TINY = "configs/tiny.yaml"


@pytest.mark.parametrize("value, expected", [(2, (2, 2)), ("3", (3, 3)), ("1-4", (1, 4)), (" 2-2 ", (2, 2))])
def test_worker_counts_and_ranges_parse(value, expected):
    assert worker_range(value) == expected


@pytest.mark.parametrize("override", ["run.num_workers=0", "run.num_workers=4-1", "run.num_workers=two",
                                      "run.num_workers=1-", "run.validation_resources={CPU: -1}",
                                      "run.checkpoint_upload=later", "run.resize_interval_s=0"])
def test_a_bad_elastic_setting_is_refused_naming_the_field(override):
    with pytest.raises(ValueError, match=override.split("=")[0].split(".")[1]):
        load_config(TINY, ["data.train=x", override])


def test_the_config_knows_its_range_and_where_its_storage_is():
    run = load_config(TINY, ["data.train=x", "run.num_workers=1-4", "run.storage_path=s3://bucket/runs"]).run
    assert (run.min_workers, run.max_workers, run.elastic, run.num_workers) == (1, 4, True, "1-4")
    assert run.remote_storage and run.local_folder == "runs"
    fixed = load_config(TINY, ["data.train=x", "run.num_workers=2"]).run
    assert (fixed.min_workers, fixed.max_workers, fixed.elastic, fixed.remote_storage) == (2, 2, False, False)


@pytest.mark.parametrize("global_batch, world, micro", [(64, 4, 16), (64, 1, 16), (64, 3, 16), (10, 4, 2),
                                                        (256, 3, 128), (7, 2, 1)])
def test_the_step_sees_the_whole_global_batch_shared_out_evenly_in_micro_batches(global_batch, world, micro):
    splits = [rank_split(global_batch, world, rank, micro) for rank in range(world)]
    assert sum(map(sum, splits)) == global_batch
    assert max(map(len, splits)) - min(map(len, splits)) <= 1
    assert all(0 < size <= micro for s in splits for size in s)
    shares = [sum(s) for s in splits]
    assert max(shares) - min(shares) <= 1


def test_the_split_at_full_size_is_one_batch_per_worker_and_at_one_worker_is_accumulation():
    assert [rank_split(64, 2, r, 32) for r in range(2)] == [[32], [32]]
    assert rank_split(64, 1, 0, 32) == [32, 32]


def test_the_sample_stream_cuts_batches_to_size_and_keeps_the_rest_in_order():
    batches = iter([{"latent": torch.arange(i * 4, i * 4 + 4), "caption": [f"c{j}" for j in range(i * 4, i * 4 + 4)]}
                    for i in range(5)])
    stream = SampleStream(batches)
    first, second, third = stream.take(3), stream.take(6), stream.take(4)
    assert first["latent"].tolist() == [0, 1, 2]
    assert second["latent"].tolist() == list(range(3, 9)) and second["caption"] == [f"c{j}" for j in range(3, 9)]
    assert third["latent"].tolist() == list(range(9, 13))
    assert stream.wait_s >= 0


def fixed_loss(net, schedule, config, latents, text, time_range=None, vocabulary=None) -> LossOutput:
    """A per-sample loss with no random draws (the diffusion loss draws noise per call), so a batch and its
    micro-batches can be compared exactly."""
    times = torch.full((len(latents),), 500)
    out = net(latents, text, times)
    err_image, err_text = out.eps_image.pow(2).flatten(1).mean(1), out.eps_text.pow(2).flatten(1).mean(1)
    kept = torch.ones(len(latents))
    return LossOutput(err_image.mean() + err_text.mean(), err_image.mean(), err_text.mean(), kept, kept)


def test_accumulated_micro_batches_give_the_update_of_one_batch(monkeypatch):
    """One batch of 8, and micro-batches of 3 + 5 weighted by their share of the global batch, leave the same
    weights; the reported loss is the same sample-weighted mean."""
    monkeypatch.setattr(psunet.training, "diffusion_loss", fixed_loss)
    cfg = load_config(TINY, ["data.train=x"])
    c = cfg.model
    batch = {"latent": torch.randn(8, *c.latent_shape), "text": torch.randn(8, c.text_len, c.word_dim)}
    split = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    results = []
    for batches in ([batch], split):
        torch.manual_seed(0)
        trainer = Trainer(PSUNet(c), cfg.optim, cfg.diffusion, torch.device("cpu"))
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)  # AdamW would blur the comparison
        out, _, _ = trainer.step(cfg.optim.warmup_steps, batches, global_batch=8)
        results.append((out.loss.item(), torch.cat([p.detach().flatten() for p in trainer.model.parameters()])))
    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in PSUNet(c).parameters()])
    assert not torch.allclose(results[0][1], start)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)


def test_validation_resources_become_ray_task_options():
    assert task_resources({"CPU": 1.0}) == {"num_cpus": 1.0}
    assert task_resources({"GPU": 1.0, "memory": 2e9}) == {"num_cpus": 0, "num_gpus": 1.0, "memory": 2e9}
    assert task_resources({"validation": 1.0}) == {"num_cpus": 0, "resources": {"validation": 1.0}}
