"""Branch training of expert denoisers on a real local Ray instance: K concurrent trainers, one assembled model."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jobs.sample import main as sample_main
from jobs.train import main
from psunet.model_folder import load_model
from psunet.config import DiffusionConfig, preset
from psunet.diffusion import NoiseSchedule, diffusion_loss
from psunet.experts import ExpertEnsemble
from psunet.model import ModelOutput
from psunet.pipeline import PSUNetPipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_a_time_range_trains_on_those_times_only():
    seen = []

    def model(image, text, times):
        seen.append(times)
        return ModelOutput(torch.zeros_like(image), torch.zeros_like(text))

    config = preset("tiny")
    for timesteps in ("shared", "slices"):
        seen.clear()
        diffusion = DiffusionConfig(timesteps=timesteps)
        for _ in range(20):
            diffusion_loss(model, NoiseSchedule(diffusion), diffusion, torch.randn(64, *config.latent_shape),
                           torch.randn(64, 16, 16), time_range=(500, 750))
        times = torch.cat(seen, dim=-1)
        # with slices a clean modality is at 0 and a dropped one at the last time: the noise levels are in range
        noise_levels = times[(times > 0) & (times < 999)] if timesteps == "slices" else times
        assert noise_levels.min() >= 500 and noise_levels.max() <= 749 and len(noise_levels.unique()) > 200
        assert set(times.unique().tolist()) - set(range(500, 750)) <= ({0, 999} if timesteps == "slices" else set())


def branch_args(demo_set, storage: Path, *extra: str) -> list[str]:
    return ["--config", TINY, *extra, f"data.train={demo_set}/train", f"data.val={demo_set}/val",
            f"run.storage_path={storage}", "run.name=branch", "run.num_workers=1", "optim.steps=6",
            "optim.warmup_steps=1", "schedule.checkpoint_every=3", "schedule.log_every=3",
            "schedule.samples=2", "schedule.sample_steps=2"]


@pytest.mark.ray
def test_branch_training_runs_k_trainers_and_assembles_one_model(tiny_model, demo_set, ray_local, tmp_path, capsys):
    storage = tmp_path / "runs"
    code = main(branch_args(demo_set, storage, "--init-from", str(tiny_model), "--experts", "2"))
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(out.split("train: done ", 1)[1])
    assert [e["interval"] for e in summary["experts"]] == [[0, 500], [500, 1000]]
    assert [e["step"] for e in summary["experts"]] == [6, 6]
    assert summary["val_loss"] > 0 and "t2i_acc_all" in summary

    # one Ray Train run per expert, each with its final checkpoint
    for i in range(2):
        assert (storage / f"branch-expert{i}").is_dir()
        assert Path(summary["experts"][i]["checkpoint"]).name.startswith("checkpoint_")

    # the MLflow parent holds the assembled model and the ensemble's metrics; one child per expert
    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED" and "val_loss" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert sorted(c.info.run_name for c in children) == ["branch-expert0", "branch-expert1"]
    assert all(c.data.params["branch.time_range"] in ("[0, 500]", "[500, 1000]") for c in children)
    assert {a.path for a in client.list_artifacts(summary["run_id"], "model")} >= {"model/model_index.json",
                                                                                   "model/denoiser"}

    # the assembled folder: an ensemble of two fine-tuned copies of the base
    ensemble, model_config, _, config = load_model(summary["model"])
    assert isinstance(ensemble, ExpertEnsemble) and ensemble.intervals == [(0, 500), (500, 1000)]
    base = load_file(str(Path(tiny_model) / "denoiser/diffusion_pytorch_model.safetensors"))
    experts = [e.state_dict() for e in ensemble.experts]
    name = "shared.mid_block.attn.qkv.weight"
    assert not torch.equal(experts[0][name], base[name]) and not torch.equal(experts[1][name], base[name])
    assert not torch.equal(experts[0][name], experts[1][name])
    assert (experts[0][name] - base[name]).abs().max() < 0.1  # fine-tuned from the base, not from scratch

    # it samples through the same PSUNetPipeline as any model
    pipe = PSUNetPipeline.from_pretrained(summary["model"])
    images, _ = pipe.text_to_image(["a small red circle on the left"])
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    assert pipe.training_step == 6
    out = tmp_path / "samples"
    assert sample_main(["--model", summary["model"], "--out", str(out), "--prompt", "a small red circle",
                        "--steps", "4"]) == 0
    assert json.loads((out / "samples.json").read_text())["network_evaluations"] == 8  # one model's cost per step


@pytest.mark.parametrize("extra, message", [
    (["--experts", "2"], "give --init-from"),
    (["--init-from", "{model}", "--experts", "0"], "integer >= 1"),
    (["--init-from", "{model}", "--intervals", "0:400,500:1000"], "gap"),
    (["--init-from", "{model}", "--intervals", "0:600,500:1000"], "overlap"),
    (["--init-from", "{model}", "--experts", "2", "--intervals", "0:500,500:1000"], "not both"),
    (["--init-from", "{model}", "--experts", "2", "model.width=64"], "model.width: base 32, config 64"),
    (["--init-from", "{nowhere}", "--experts", "2"], "not a model folder or training checkpoint"),
    (["--init-from", "{model}", "branch.time_range=[500,2000]"], "branch.time_range"),
    (["--init-from", "{model}", "branch.time_range=[0,500]", "diffusion.prediction=flow", "diffusion.text_shift=2"],
     "diffusion.text_shift 1"),
    (["--init-from", "{model}", "--experts", "2", "diffusion.prediction=epsilon"],
     "the base model predicts v (image) and v (text), this config trains epsilon and epsilon"),
])
def test_bad_branch_requests_are_refused_before_anything_starts(tiny_model, demo_set, tmp_path, capsys, extra,
                                                                 message):
    storage = tmp_path / "runs"
    extra = [e.format(model=tiny_model, nowhere=tmp_path / "nowhere") for e in extra]
    assert main(branch_args(demo_set, storage, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not storage.exists()
