"""jobs/train.py before any worker starts: config and shard checks, the learning-rate schedule.

Training itself runs end to end on a real two-node cluster in test_cluster_local.py.
"""

import math
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.train import main
from psunet.training import lr_at

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.mark.parametrize("override, field", [
    ("optim.lr=-1", "optim.lr"),
    ("optim.learning_rate=0.1", "optim.learning_rate"),
    ("model.shared_depth=4", "shared_depth"),
    ("run.num_workers=0", "run.num_workers"),
    ("optim.warmup_steps=50", "optim.warmup_steps"),
])
def test_an_invalid_config_fails_before_anything_starts_and_names_the_field(override, field, tmp_path, capsys):
    storage = tmp_path / "runs"
    assert main(["--config", TINY, override, f"run.storage_path={storage}"]) == 2
    assert field in capsys.readouterr().err
    assert not storage.exists()


def test_a_missing_config_file_or_shard_folder_is_named(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["--config", TINY, f"data.train={tmp_path / 'no-shards'}", "data.val=null",
                 f"run.storage_path={tmp_path / 'runs'}"]) == 2
    assert "no-shards" in capsys.readouterr().err


@pytest.mark.ray
def test_shards_that_do_not_fit_the_model_are_refused_with_the_mismatch_named(demo_set, tmp_path, capsys):
    storage = tmp_path / "runs"
    code = main(["--config", TINY, "model.word_dim=32", f"data.train={demo_set / 'train'}",
                 f"data.val={demo_set / 'val'}", f"run.storage_path={storage}"])
    err = capsys.readouterr().err
    assert code == 2 and "word_dim" in err and "32" in err and "16" in err
    assert not storage.exists()


def test_learning_rate_warms_up_then_decays_to_the_floor():
    optim = load_config(TINY, ["optim.steps=1000", "optim.warmup_steps=100", "optim.lr=1e-3",
                               "optim.min_lr_ratio=0.1"]).optim
    assert lr_at(0, optim) == pytest.approx(1e-5)
    assert lr_at(99, optim) == pytest.approx(1e-3)
    assert lr_at(100, optim) == pytest.approx(1e-3)
    middle = 100 + 450
    assert lr_at(middle, optim) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_at(1000, optim) == pytest.approx(1e-4)
    assert all(lr_at(s, optim) >= lr_at(s + 1, optim) for s in range(100, 1000))


def test_validation_samples_take_the_samplers_guidance_unless_the_config_sets_one():
    from psunet.settings import SamplerSettings

    def guidance(*overrides: str) -> tuple[float, float]:
        return load_config(TINY, list(overrides)).schedule.sampler().guidance

    defaults = SamplerSettings()
    assert guidance() == defaults.guidance == (3.0, 1.0)  # the image guided, the caption not
    assert load_config(TINY, []).schedule.sampler() == SamplerSettings(steps=4)  # tiny's sample_steps, the rest default
    assert guidance("schedule.guidance_scale=5") == (5.0, 5.0)
    assert guidance("schedule.guidance_scale_text=2") == (3.0, 2.0)
    assert guidance("schedule.guidance_scale=5", "schedule.guidance_scale_image=2") == (2.0, 5.0)


def test_a_failed_run_names_the_cause_a_worker_error_or_the_controllers_own_even_without_text():
    from ray.train import ControllerError

    from jobs.training_run import cause

    worker = RuntimeError("Training failed due to worker errors:\nTraceback ...\nValueError: shard 3 is corrupt")
    assert cause(worker) == "ValueError: shard 3 is corrupt"
    assert cause(ControllerError(AssertionError())) == "Ray Train's controller failed: AssertionError"
    assert cause(ControllerError(KeyError("checkpoint_0000800"))) == \
        "Ray Train's controller failed: KeyError: 'checkpoint_0000800'"
