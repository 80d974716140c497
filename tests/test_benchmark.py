"""jobs/benchmark.py: every subcommand runs on the tiny preset and prints one JSON object with every field present
and positive; each has its own options and checks them. No timing thresholds: the figures themselves live in
BENCHMARKS.md."""

import json
import math
import os
import re
import time

import mlflow
import pytest
import torch

from jobs.bench.parts import run_parts, timed_part
from jobs.bench.system import train_resume_check
from jobs.benchmark import main, parse
from psunet.training import native_bf16

FIELDS = {
    "train": ["samples_per_s", "step_ms", "forward_flops_per_sample", "train_flops_per_sample", "achieved_flops",
              "matmul_peak_flops", "mfu", "peak_memory_mb", "target_mfu"],
    "overhead": ["bare_step_ms", "trainer_step_ms", "ratio", "target_ratio_max"],
    "loader": ["reader_samples_per_s", "train_samples_per_s", "headroom", "samples_1x", "samples_10x", "rss_mb_1x",
               "rss_mb_10x", "rss_ratio_10x_over_1x", "target_headroom"]
              + [f"{key}{suffix}" for key in ("data_wait_fraction", "data_wait_ms_per_step", "compute_ms_per_step")
                 for suffix in ("", "_workers2")],
    "sampling": ["ms_per_step_batch1", "ms_per_step_batch16", "ms_per_step_batch64", "evaluations_per_step_guided",
                 "evaluations_per_step_unguided", "batched_guidance_forward_ms", "two_forwards_ms",
                 "guidance_batching_speedup", "text_to_image_latency_ms", "image_to_text_latency_ms"],
    "convergence": [f"{key}_{model}" for model in ("psunet", "baseline", "baseline_flops", "psunet_memory")
                    for key in ("parameters", "train_flops_per_sample", "activation_mb", "training_memory_mb",
                                "seconds_per_step", "batch_size", "final_val_loss", "final_t2i_accuracy",
                                "final_i2t_accuracy")]
                   + [f"{metric}_{axis}_ratio_{model}" for metric in ("val_loss", "t2i_accuracy", "i2t_accuracy")
                      for axis in ("step", "train_flops", "seconds") for model in ("baseline", "baseline_flops")],
    "serve": [f"{mode}_{clients}c_{key}" for mode in ("batching", "no_batching") for clients in (1, 4, 16)
              for key in ("requests_per_s", "p50_ms", "p99_ms", "requests_per_forward")]
             + [f"mixed_16c_{key}" for key in ("requests_per_s", "p50_ms", "p99_ms")]
             + ["batching_speedup_16_clients", "replica_threads"],
    "overload": ["admitted", "refused", "refused_p50_ms", "refused_max_ms", "admitted_p50_ms", "admitted_p99_ms",
                 "service_refused_overloaded"],
    "convergence-ode": ["parameters_ode", "parameters_psunet", "activation_mb_psunet", "activation_mb_ode",
                        "sampling_ms_per_step_batch1_psunet", "sampling_ms_per_step_batch1_ode",
                        "sampling_ms_per_step_batch16_ode", "final_val_loss_ode", "final_t2i_accuracy_ode"],
    "convergence-experts": ["base_val_loss", "base_t2i_accuracy", "one_model_val_loss", "one_model_t2i_accuracy",
                            "one_model_training_steps", "experts2_val_loss", "experts2_t2i_accuracy",
                            "experts2_training_steps", "experts2_sampling_ms_per_step_batch1"],
    "paint": ["in_region_weight_0", "in_region_weight_4", "samples"],
    "checkpoints": [f"{variant}_{key}" for variant in ("sync", "async", "async_validated")
                    for key in ("checkpoint_stall_ms", "checkpoint_stall_ms_max", "samples_per_s")]
                   + ["validation_s_median", "validation_s_max", "async_stall_ratio", "validation_slowdown"],
    "objectives": [f"{objective}_{key}" for objective in ("shared", "independent", "slices")
                   for key in ("t2i_mean_accuracy", "i2t_mean_accuracy", "val_loss", "fid")],
}


def _arguments(command: str, demo_set, tiny_model, tmp_path) -> list[str]:
    """Each case at the smallest sizes that still give every field: one step where a step is timed, one sampler
    step, two held-out samples, two seeds and two guidance scales where spread and best scale are checked."""
    small = ["--preset", "tiny", "--batch-size", "2", "--steps", "1"]
    data = [f"data.train={demo_set}/train", f"data.val={demo_set}/val"]
    return {
        "train": small,
        "overhead": small + ["--rounds", "1"],
        "loader": small + ["--data", f"{demo_set}/train"],
        "sampling": ["--preset", "tiny", "--model", str(tiny_model), "--sample-steps", "1"],
        "convergence": ["--config", "configs/tiny.yaml", "--steps", "2", "--eval-every", "1", "--accuracy-every", "2",
                        "--seeds", "2", "--samples", "2", "--guidance-scales", "1,3", "--sample-steps", "1",
                        "--timing-steps", "1", "--out-dir", str(tmp_path), *data],
        "serve": ["--model", str(tiny_model), "--sample-steps", "1", "--requests", "1", "--load-requests", "3",
                  "--precision", "bf16"],
        "overload": ["--model", str(tiny_model), "--sample-steps", "100", "--clients", "6", "--bound", "1"],
        "convergence-ode": ["--against", "ode", "--config", "configs/tiny.yaml", "--steps", "1", "--eval-every", "1",
                            "--samples", "2", "--guidance-scales", "1", "--sample-steps", "1", "--timing-steps", "1",
                            "--out-dir", str(tmp_path), *data, "model.shared_depth=5", "model.ode_solver=euler"],
        "convergence-experts": ["--against", "experts", "--config", "configs/tiny.yaml", "--steps", "2",
                                "--branch-at", "1", "--samples", "2", "--guidance-scales", "1", "--sample-steps", "1",
                                *data],
        "paint": ["--model", str(tiny_model), "--sample-steps", "1", "--samples", "2", "--paint-weights", "0,4"],
        "checkpoints": ["--config", "configs/tiny.yaml", "--steps", "2", "--checkpoint-every", "1", *data,
                        "optim.warmup_steps=1", "schedule.log_every=1", "schedule.samples=1",
                        "schedule.sample_steps=1"],
        "objectives": ["--config", "configs/tiny.yaml", "--steps", "1", "--samples", "4", "--sample-steps", "1",
                       "--guidance-scales", "1,3", *data],
    }[command]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One MLflow store for every case (each run found by its id): its tables are created once."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.mark.parametrize("case", FIELDS)
def test_benchmark_prints_json_with_every_field_positive(case, demo_set, tiny_model, tmp_path, mlflow_uri, ray_local,
                                                         capsys):
    # in this process, on the session's Ray instance: tests/test_entry_points.py runs jobs/benchmark.py as a script
    arguments = _arguments(case, demo_set, tiny_model, tmp_path)
    command = case.split("-")[0]
    code = main([command, *arguments, "--tracking-uri", mlflow_uri])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["benchmark"] == command
    for field in FIELDS[case]:
        assert field in figures, field
        value = figures[field]
        assert isinstance(value, (int, float)) and math.isfinite(value), (field, value)
        # accuracies are fractions (0 is possible after a few steps); everything else is a positive measure
        fraction = ("accuracy" in field and "ratio" not in field) or "in_region" in field
        assert 0 <= value <= 1 if fraction else value > 0, (field, value)
    if command == "train":  # MFU against the peak of the dtype the step trains in (configs/demo.yaml asks bf16)
        assert figures["dtype"] == ("bfloat16" if native_bf16(torch.device("cpu")) else "float32")
    if command == "sampling":
        assert figures["evaluations_per_step_guided"] == 2 and figures["evaluations_per_step_unguided"] == 1
    if command == "serve":
        assert figures["precision"] == "bf16" and figures["no_batching_16c_requests_per_forward"] == 1
        assert figures["replica_threads"] == os.cpu_count()  # the replica gets the node's cores by default
        assert figures["mixed_16c_errors"] == 0 and figures["batching_16c_errors"] == 0
    if command == "overload":  # every request answered, a refusal counted by the service too
        assert figures["admitted"] + figures["refused"] == 6 and figures["other"] == 0 and figures["healthy_after"]
        assert figures["service_refused_overloaded"] == figures["refused"]
    if command == "checkpoints":  # validation ran only where asked; data waits are fractions
        assert figures["validation_s_max"] >= figures["validation_s_median"]
        assert all(0 <= figures[f"{v}_data_wait_fraction"] < 1 for v in ("sync", "async", "async_validated"))
    if command == "loader":
        assert figures["samples_10x"] == 10 * figures["samples_1x"]
        for suffix in ("", "_workers2"):
            assert 0 <= figures[f"data_wait_fraction{suffix}"] < 1
    if figures.get("against") == "ode":
        assert figures["parameters_ode"] < figures["parameters_psunet"]
        assert (tmp_path / "convergence_ode.png").stat().st_size > 0
    if figures.get("against") == "experts":
        assert figures["one_model_intervals"] == [[0, 1000]] and figures["experts2_intervals"] == [[0, 500], [500, 1000]]
        assert figures["experts2_training_steps"] == 1 + 2 * 1 and figures["one_model_training_steps"] == 1 + 1
    if command == "objectives":
        for objective in ("shared", "independent", "slices"):
            best = figures[objective]["best"]
            assert best["t2i"]["guidance_scale_image"] in (1.0, 3.0) and best["i2t"]["guidance_scale_text"] in (1.0, 3.0)
            assert set(figures[objective]["by_guidance"]) == {"1.0", "3.0"}  # JSON keys
            assert 0 <= figures[objective]["by_guidance"]["3.0"]["infill_colour"] <= 1
    if figures.get("against") == "baseline":
        _check_backbones(figures, tmp_path)

    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(figures["mlflow_run_id"])
    assert run.data.tags["psunet.benchmark"] == command
    first = FIELDS[case][0]
    assert run.data.metrics[first] == pytest.approx(figures[first])
    if figures.get("against") == "baseline":  # every curve point at its step
        history = client.get_metric_history(run.info.run_id, "psunet_seed1_val_loss")
        assert [m.step for m in history] == [1, 2]
        assert history[-1].value == pytest.approx(figures["curves"]["psunet"][1][-1]["val_loss"])


def _check_backbones(figures: dict, tmp_path) -> None:
    """Equal parameters, equal FLOPs and equal memory hold by construction; two seeds, same evaluation points."""
    assert figures["parameters_psunet"] == figures["parameters_baseline"]
    assert figures["train_flops_per_sample_baseline"] > 1.2 * figures["train_flops_per_sample_psunet"]
    assert figures["train_flops_per_sample_baseline_flops"] == pytest.approx(figures["train_flops_per_sample_psunet"],
                                                                              rel=0.1)
    assert figures["parameters_baseline_flops"] < figures["parameters_baseline"]
    assert figures["batch_size_psunet_memory"] > figures["batch_size_psunet"]
    assert figures["activation_mb_psunet_memory"] == pytest.approx(figures["activation_mb_baseline"], rel=0.1)
    assert figures["seeds"] == [0, 1]
    for model, seeds in figures["curves"].items():
        assert len(seeds) == 2
        for points in seeds:
            assert [p["step"] for p in points] == [1, 2]
            assert "t2i_accuracy" not in points[0] and points[1]["t2i_guidance"] in (1.0, 3.0)
            assert points[1]["train_flops"] == (2 * figures[f"batch_size_{model}"]
                                                * figures[f"train_flops_per_sample_{model}"])
    loss = figures["summary"]["val_loss"]
    for model in figures["models"]:
        final = [seed[-1]["val_loss"] for seed in figures["curves"][model]]
        assert loss["final"][model]["mean"] == pytest.approx(sum(final) / 2)
        assert loss["final"][model]["min"] == min(final) and loss["final"][model]["max"] == max(final)
    assert (tmp_path / "convergence_baseline.png").stat().st_size > 0


@pytest.mark.ray
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the gpu benchmark measures")
def test_gpu_without_cuda_says_no_gpu_and_succeeds(tmp_path, capsys):
    assert main(["gpu", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    figures = json.loads(lines[0])
    assert figures["gpu"] is None and "no GPU" in figures["message"]
    assert not (tmp_path / "mlflow.db").exists()  # nothing measured, nothing logged


def test_gpu_plan_checks_its_inputs():
    with pytest.raises(ValueError, match="first_steps < then_steps"):
        train_resume_check(30, 20)
    with pytest.raises(ValueError, match="weight > 0"):
        run_parts([("part", 0, dict, ())], 10)
    with pytest.raises(ValueError, match="total_s > 0"):
        run_parts([("part", 1, dict, ())], 0)
    assert timed_part(dict, (), 0) == {"error": "not started: no time left", "seconds": 0.0}


def test_gpu_plan_records_a_failing_or_overrunning_part_and_goes_on():
    started = time.perf_counter()
    figures = run_parts([("fails", 4, math.sqrt, (-1.0,)), ("overruns", 1, time.sleep, (600,)),
                         ("works", 4, dict, ({"x": 1},))], 45)
    assert figures["fails_error"] == "ValueError: math domain error"
    assert figures["overruns_error"].startswith("overran its budget")
    assert figures["overruns_seconds"] == pytest.approx(figures["overruns_budget_s"], abs=2)
    assert figures["works_x"] == 1 and "works_error" not in figures
    assert time.perf_counter() - started < 45 + 15  # a killed part gets no grace time



# Each command's own options (besides --help and --tracking-uri); the commands that take config overrides.
OPTIONS = {
    "train": ["--preset", "--batch-size", "--steps", "--config", "--device", "--compile"],
    "overhead": ["--preset", "--batch-size", "--steps", "--config", "--device", "--rounds"],
    "loader": ["--preset", "--batch-size", "--steps", "--config", "--device", "--data"],
    "sampling": ["--preset", "--model", "--sample-steps", "--precision", "--compile", "--device"],
    "convergence": ["--config", "--against", "--models", "--steps", "--seeds", "--seed", "--eval-every",
                    "--accuracy-every", "--no-accuracy", "--samples", "--guidance-scales", "--sample-steps",
                    "--timing-steps", "--experts", "--branch-at", "--out-dir", "--device"],
    "objectives": ["--config", "--objectives", "--steps", "--seed", "--samples", "--guidance-scales", "--sample-steps",
                   "--device"],
    "time-to-quality": ["--config", "--recipes", "--only", "--steps", "--eval-at", "--seeds", "--seed", "--samples",
                        "--guidance-scales", "--sample-steps", "--out-dir", "--device"],
    "paint": ["--model", "--samples", "--paint-weights", "--paint-fraction", "--sample-steps", "--seed", "--device"],
    "serve": ["--model", "--sample-steps", "--requests", "--load-requests", "--serve-cpus", "--precision"],
    "overload": ["--model", "--sample-steps", "--clients", "--bound", "--serve-cpus"],
    "checkpoints": ["--config", "--steps", "--checkpoint-every", "--workers", "--storage-path"],
    "gpu": ["--config", "--batch-size", "--steps", "--sample-steps"],
}
OVERRIDES = {"convergence", "objectives", "time-to-quality", "checkpoints"}


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 0
    return capsys.readouterr().out


def _options(page: str) -> dict[str, str]:
    """An argparse help page's options: name -> help text (one line)."""
    options = {}
    for entry in re.split(r"\n(?=  -)", page.split("\noptions:\n", 1)[1]):
        name, help = re.fullmatch(r"\s*(?:-\w, )?(--[\w-]+)(?: \S+)?\s+(.*)", entry, re.DOTALL).groups()
        options[name] = " ".join(help.split())
    return options


def test_the_top_level_help_lists_every_command_and_the_examples(capsys):
    page = _help(["--help"], capsys)
    for command in OPTIONS:
        assert f"\n    {command} " in page or f"\n    {command}\n" in page, command
    assert "python jobs/benchmark.py convergence --against experts --experts 2" in page
    assert "python jobs/benchmark.py <command> --help" in page


@pytest.mark.parametrize("command", OPTIONS)
def test_each_command_lists_its_own_options_and_no_others(command, capsys):
    page = _help([command, "--help"], capsys)
    options = _options(page)
    assert set(options) == {"--help", "--tracking-uri", *OPTIONS[command]}
    others = {option for name, listed in OPTIONS.items() if name != command for option in listed}
    assert not (others - set(OPTIONS[command])) & set(options)
    assert ("section.field=value" in page) == (command in OVERRIDES)
    if command == "convergence":
        assert "--against" in options and "--requests" not in options
    if command == "serve":
        assert "--requests" in options and "--against" not in options


def test_steps_and_samples_say_what_they_count_in_each_command(capsys):
    pages = {command: _options(_help([command, "--help"], capsys)) for command in OPTIONS}
    for option in ("--steps", "--samples"):
        helps = [options[option] for options in pages.values() if option in options]
        assert len(helps) >= 4 and len(set(helps)) == len(helps), (option, helps)
    assert "default: 20" in pages["convergence"]["--steps"] and "default: 128" in pages["paint"]["--samples"]


@pytest.mark.parametrize("argv, message", [
    (["loader"], "loader needs --data <shard folder>"),
    (["serve"], "serve needs --model"),
    (["paint", "--samples", "2"], "paint needs --model"),
    (["convergence", "--steps", "0"], "argument --steps: must be >= 1"),
    (["overhead", "--rounds", "0"], "argument --rounds: must be >= 1"),
    (["checkpoints", "--checkpoint-every", "0"], "argument --checkpoint-every: must be >= 1"),
    (["convergence", "--against", "experts", "--steps", "3", "--branch-at", "3"],
     "--branch-at must be in (0, --steps=3), got 3"),
    (["serve", "--model", "m", "--against", "ode"], "unrecognized arguments: --against ode"),
    (["convergence", "--requests", "2"], "unrecognized arguments: --requests"),  # 2: an override
    (["nothing"], "invalid choice: 'nothing'"),
])
def test_each_command_checks_its_own_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_convergence_defaults_follow_its_other_options_and_overrides_go_anywhere():
    args = parse(["convergence", "--steps", "9", "model.width=8", "--eval-every", "3", "data.train=x"])
    assert (args.accuracy_every, args.branch_at, args.overrides) == (3, 6, ["model.width=8", "data.train=x"])
    args = parse(["convergence", "--steps", "9", "--accuracy-every", "4", "--branch-at", "2"])
    assert (args.accuracy_every, args.branch_at, args.overrides) == (4, 2, [])
