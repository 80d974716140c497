"""jobs/sample.py and jobs/evaluate.py on a tiny model trained here: every scenario, bad input, MLflow, Ray."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.evaluate import sweep_settings
from jobs.evaluate import main as evaluate_main
from jobs.quality import blank_colour, frechet_distance, is_demo_data, wilson_interval
from jobs.model_ref import load_pipeline
from jobs.sample import main as sample_main
from psunet.data import make_loader
from psunet.settings import SamplerSettings, parse_guidance

FAST = ["--steps", "4"]


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory):
    """Two demo-like images at the model's resolution and a mask generating their right half."""
    pipe = load_pipeline(str(tiny_model))
    folder = tmp_path_factory.mktemp("inputs")
    from dataprep import shapes

    paths = []
    for i, sample in enumerate(shapes.generate(2, seed=5, size=pipe.resolution, max_objects=1)):
        paths.append(folder / f"image{i}.png")
        Image.fromarray(sample.image).save(paths[-1])
    mask = np.zeros((pipe.resolution, pipe.resolution), np.uint8)
    mask[:, pipe.resolution // 2:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(np.zeros((pipe.resolution * 2, pipe.resolution * 2, 3), np.uint8)).save(folder / "big.png")
    (folder / "text.png").write_text("not an image")
    return {"images": [str(p) for p in paths], "mask": str(folder / "mask.png"), "big": str(folder / "big.png"),
            "text": str(folder / "text.png"), "resolution": pipe.resolution}


def _read(out: Path) -> dict:
    return json.loads((out / "samples.json").read_text())


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _given_words_kept(prompt: str, caption: str) -> bool:
    """Every given word in place; each [?] filled with one word or dropped."""
    pattern = " ?".join(r"(\S+)?" if word == "[?]" else re.escape(word) for word in prompt.split())
    return re.fullmatch(pattern, caption) is not None


def test_text_to_image_many_prompts_one_batch(tiny_model, inputs, tmp_path):
    out = tmp_path / "t2i"
    prompts = ["a small red circle on the left", "a large blue square at the top", "a big green triangle"]
    args = ["--model", str(tiny_model), "--out", str(out), *FAST]
    assert sample_main(args + [a for p in prompts for a in ("--prompt", p)]) == 0
    result = _read(out)
    assert [s["prompt"] for s in result["samples"]] == prompts
    assert [s["caption"] for s in result["samples"]] == prompts  # a fully given caption comes back as given
    assert result["network_evaluations"] == 2 * 4  # guided: one batched forward of cond + uncond per step
    for record in result["samples"]:
        assert _png(out / record["image"]).shape == (inputs["resolution"], inputs["resolution"], 3)
    assert (out / "captions.txt").read_text().splitlines() == prompts
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > inputs["resolution"] and sheet.height > inputs["resolution"]


def test_paint_with_words_from_the_command_line(tiny_model, inputs, tmp_path):
    prompt = ["--prompt", "a small red circle on the left", "--seed", "3"]
    plain, painted, by_mask = tmp_path / "plain", tmp_path / "painted", tmp_path / "by_mask"
    args = ["--model", str(tiny_model), *FAST, *prompt]
    assert sample_main(args + ["--out", str(plain)]) == 0
    assert sample_main(args + ["--out", str(painted), "--paint", "red=16,0,32,32", "--paint-weight", "8"]) == 0
    assert sample_main(args + ["--out", str(by_mask), "--paint", f"2={inputs['mask']}", "--paint-weight", "8"]) == 0
    assert _read(painted)["paint"] == ["red=16,0,32,32"] and _read(painted)["paint_weight"] == 8
    assert not np.array_equal(_png(plain / "sample_000.png"), _png(painted / "sample_000.png"))
    # the mask is the right half, word 2 is "red": the same request as the box
    assert np.array_equal(_png(painted / "sample_000.png"), _png(by_mask / "sample_000.png"))


def test_all_prompts_share_each_forward(tiny_model):
    pipe = load_pipeline(str(tiny_model))
    calls = []
    hook = pipe.model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        pipe.infill(prompts=["a red circle"] * 5, settings=SamplerSettings(steps=3))
    finally:
        hook.remove()
    assert calls == [10, 10, 10]  # 5 prompts x (cond, uncond), 3 steps


def test_bf16_precision_casts_the_denoiser_once_and_samples_close_to_fp32(tiny_model):
    import torch

    full, half = load_pipeline(str(tiny_model)), load_pipeline(str(tiny_model), precision="bf16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16} and half.precision == "bf16"
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    text = half.codec.encode(["a small red circle on the left"] * 2).vectors
    outs = [pipe.sample(2, SamplerSettings(steps=4), seeds=[1, 2], text_known=text) for pipe in (full, half)]
    assert outs[1].image_latents.dtype == torch.float32  # the sampler's state stays fp32
    gap = (outs[0].image_latents - outs[1].image_latents).abs().mean() / outs[0].image_latents.abs().mean()
    assert 0 < gap < 0.1
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        load_pipeline(str(tiny_model), precision="fp16")


def test_image_to_text_keeps_the_image_and_writes_captions(tiny_model, inputs, tmp_path):
    out = tmp_path / "i2t"
    args = ["--model", str(tiny_model), "--out", str(out), *FAST]
    assert sample_main(args + ["--image", inputs["images"][0], "--image", inputs["images"][1]]) == 0
    result = _read(out)
    assert len(result["samples"]) == 2
    for record, source in zip(result["samples"], inputs["images"]):
        assert isinstance(record["caption"], str) and record["input_image"] == source
        assert np.array_equal(_png(out / record["image"]), _png(source))


def test_unconditional_pairs(tiny_model, inputs, tmp_path):
    out = tmp_path / "pairs"
    assert sample_main(["--model", str(tiny_model), "--out", str(out), "--generate", "3", *FAST]) == 0
    result = _read(out)
    assert len(result["samples"]) == 3 and all(s["prompt"] is None for s in result["samples"])
    images = [_png(out / s["image"]) for s in result["samples"]]
    assert not np.array_equal(images[0], images[1])


def test_partial_text_infilling_keeps_the_given_words(tiny_model, tmp_path):
    out = tmp_path / "blanks"
    prompts = ["a [?] circle on the [?]", "a large [?] square at the top"]
    args = ["--model", str(tiny_model), "--out", str(out), *FAST]
    assert sample_main(args + [a for p in prompts for a in ("--prompt", p)]) == 0
    for record, prompt in zip(_read(out)["samples"], prompts):
        assert "[?]" not in record["caption"]
        assert _given_words_kept(prompt, record["caption"]), (prompt, record["caption"])


def test_image_region_infilling_keeps_unmasked_pixels_exactly(tiny_model, inputs, tmp_path):
    out = tmp_path / "region"
    args = ["--model", str(tiny_model), "--out", str(out), *FAST, "--image", inputs["images"][0],
            "--mask", inputs["mask"]]
    assert sample_main(args) == 0
    generated, source = _png(out / "sample_000.png"), _png(inputs["images"][0])
    half = inputs["resolution"] // 2
    assert np.array_equal(generated[:, :half], source[:, :half])
    assert not np.array_equal(generated[:, half:], source[:, half:])


def test_text_and_image_infilling_together(tiny_model, inputs, tmp_path):
    out = tmp_path / "both"
    prompt = "a small [?] circle on the left"
    args = ["--model", str(tiny_model), "--out", str(out), *FAST, "--image", inputs["images"][1],
            "--mask", inputs["mask"], "--prompt", prompt]
    assert sample_main(args) == 0
    record = _read(out)["samples"][0]
    assert _given_words_kept(prompt, record["caption"])
    half = inputs["resolution"] // 2
    assert np.array_equal(_png(out / record["image"])[:, :half], _png(inputs["images"][1])[:, :half])


def test_resize_option_accepts_other_sizes(tiny_model, inputs, tmp_path):
    out = tmp_path / "resized"
    args = ["--model", str(tiny_model), "--out", str(out), *FAST, "--image", inputs["big"], "--resize"]
    assert sample_main(args) == 0
    assert _png(out / "sample_000.png").shape == (inputs["resolution"], inputs["resolution"], 3)


def test_a_model_from_an_mlflow_run_needs_no_other_files(tiny_model, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("models", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(tiny_model), "model")
    out = tmp_path / "from-mlflow"
    args = ["--model", f"runs:/{run.info.run_id}/model", "--tracking-uri", uri, "--out", str(out), *FAST,
            "--prompt", "a small red circle on the left"]
    assert sample_main(args) == 0
    assert (out / "sample_000.png").is_file()


def _mismatched_model(tiny_model, tmp_path) -> str:
    broken = tmp_path / "mismatched"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "denoiser/config.json").read_text())
    config["model"]["width"] *= 2
    (broken / "denoiser/config.json").write_text(json.dumps(config))
    return str(broken)


BAD = [
    (["--prompt", "zzz qqq"], "no word in the model's vocabulary"),
    (["--prompt", "   "], "prompt 0 is empty"),
    (["--prompt", "a red circle", "--steps", "0"], "\nsteps\n"),
    (["--prompt", "a red circle", "--steps", "1000000"], "\nsteps\n"),
    (["--prompt", "a red circle", "--guidance-scale", "nan"], "\nguidance_scale_image\n"),
    (["--prompt", "a red circle", "--guidance-scale", "-1"], "\nguidance_scale_text\n"),
    (["--prompt", "a red circle", "--guidance-scale-image", "inf"], "\nguidance_scale_image\n"),
    (["--prompt", "a red circle", "--scheduler", "heun"], "unknown scheduler 'heun'"),
    (["--prompt", "a red circle", "--scheduler", "euler"], "'euler' samples flow models only"),  # a v model
    (["--prompt", "a red circle", "--spacing", "middle"], "\nspacing\n"),
    (["--image", "{big}"], "the model needs"),
    (["--image", "{text}"], "not a readable image"),
    (["--image", "{image}", "--mask", "{big}"], "mask is"),
    (["--mask", "{mask}", "--prompt", "a red circle"], "--mask needs --image"),
    (["--image", "{missing}"], "image file not found"),
    (["--generate", "2", "--prompt", "a red circle"], "cannot be combined"),
    (["--generate", "0"], "--generate must be"),
    ([], "nothing to sample"),
    (["--prompt", "a", "--prompt", "b", "--image", "{image}", "--image", "{image}", "--image", "{image}"], "--prompt"),
    (["--prompt", "a red circle", "--paint", "blue=0,0,16,16"], "prompt 0 has no word 'blue'"),
    (["--prompt", "a red circle", "--paint", "3=0,0,16,16"], "word index 3 is outside the caption"),
    (["--prompt", "a red circle", "--paint", "red=0,0,64,16"], "'red=0,0,64,16': box [0, 0, 64, 16] must lie inside"),
    (["--prompt", "a red circle", "--paint", "red={big}"], "the model needs"),
    (["--prompt", "a red circle", "--paint", "red"], "WORD=x0,y0,x1,y1"),
    (["--prompt", "a red circle", "--paint", "red=0,0,16,16", "--paint-weight", "-2"], "paint weight"),
    (["--prompt", "a red circle", "--paint", "red=0,0,16,16", "--paint-fraction", "1.5"], "paint fraction"),
    (["--generate", "1", "--paint", "red=0,0,16,16"], "--paint needs --prompt"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_is_refused_and_nothing_is_written(tiny_model, inputs, tmp_path, capsys, extra, message):
    paths = {"big": inputs["big"], "text": inputs["text"], "image": inputs["images"][0], "mask": inputs["mask"],
             "missing": str(tmp_path / "missing.png")}
    out = tmp_path / "out"
    code = sample_main(["--model", str(tiny_model), "--out", str(out), *FAST] + [a.format(**paths) for a in extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_a_guidance_scale_per_modality_is_used_and_recorded(tiny_model, tmp_path, capsys):
    prompt = ["--model", str(tiny_model), *FAST, "--prompt", "a small red circle on the left", "--seed", "3"]
    split, both = tmp_path / "split", tmp_path / "both"
    assert sample_main(prompt + ["--out", str(split), "--guidance-scale", "4", "--guidance-scale-image", "1",
                                 "--spacing", "leading"]) == 0
    assert "guidance image 1 / text 4" in capsys.readouterr().out
    assert sample_main(prompt + ["--out", str(both), "--guidance-scale", "4", "--spacing", "leading"]) == 0
    settings = _read(split)["settings"]
    assert (settings["guidance_scale_image"], settings["guidance_scale_text"]) == (1.0, 4.0)
    assert settings["spacing"] == "leading" and settings["steps"] == 4 and settings["seed"] == 3
    assert _read(both)["settings"]["guidance_scale_image"] == 4.0
    assert _read(split)["network_evaluations"] == 2 * 4  # the text's scale 4 still asks for the guided pass
    # the caption is given: only the image's scale changes the image
    assert not np.array_equal(_png(split / "sample_000.png"), _png(both / "sample_000.png"))


def test_an_invalid_per_modality_guidance_scale_is_refused_naming_its_field(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(tiny_model), "--out", str(out), *FAST, "--prompt", "a red circle",
            "--guidance-scale-image", "2", "--guidance-scale-text", "-0.5"]
    assert sample_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sample: error:") and "\nguidance_scale_text\n" in err and "input_value=-0.5" in err
    assert "guidance_scale_image" not in err
    assert not out.exists()


@pytest.mark.parametrize("which,message", [("missing", "neither a folder nor a model URI"),
                                           ("mismatched", "weights do not match its model config"),
                                           ("no-vectors", "has no word_vectors/words.bin")])
def test_a_missing_or_mismatched_checkpoint_is_named(tiny_model, tmp_path, capsys, which, message):
    if which == "missing":
        model = str(tmp_path / "nowhere")
    elif which == "mismatched":
        model = _mismatched_model(tiny_model, tmp_path)
    else:
        model = str(tmp_path / "bare")
        shutil.copytree(tiny_model, model)
        (Path(model) / "word_vectors/words.bin").unlink()
    out = tmp_path / "out"
    assert sample_main(["--model", model, "--out", str(out), "--prompt", "a red circle", *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_existing_output_folder_is_kept_unless_overwrite(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--model", str(tiny_model), "--out", str(out), "--prompt", "a red circle", *FAST]
    assert sample_main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert sample_main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "sample_000.png").is_file()


def test_wilson_interval_and_demo_detection():
    low, high = wilson_interval(0.5, 100)
    assert low < 0.5 < high and high - low == pytest.approx(0.196, abs=0.005)
    assert wilson_interval(1.0, 10)[1] == 1.0 and wilson_interval(1.0, 10)[0] > 0.65
    assert (wilson_interval(0.5, 1000)[1] - wilson_interval(0.5, 1000)[0]) < (high - low)
    assert is_demo_data(["a small red circle on the left", "a big blue box at the top"])
    assert not is_demo_data(["a dog on a sofa", "a small red circle on the left"])
    base = SamplerSettings(guidance_scale=3.0, steps=25)
    settings = sweep_settings(base, parse_guidance("1,3,5:2"), [10, 25])
    assert settings == [base, SamplerSettings(guidance_scale=1.0, steps=25),
                        SamplerSettings(guidance_scale_image=5.0, guidance_scale_text=2.0, steps=25),
                        SamplerSettings(guidance_scale=3.0, steps=10)]
    with pytest.raises(ValueError, match="image:text"):
        parse_guidance("1,2:3:4")
    assert blank_colour("a small red circle on the left") == "a small [?] circle on the left"


def test_frechet_distance_tells_real_from_noise(tiny_model, demo_set):
    from jobs.quality import AutoencoderFeatures
    from torchmetrics.image.fid import FrechetInceptionDistance

    pipe = load_pipeline(str(tiny_model))
    metric = FrechetInceptionDistance(feature=AutoencoderFeatures(pipe))
    batch = next(iter(make_loader(f"{demo_set}/val", 48, training=False, rank=0, world_size=1)))
    real = pipe.decode_images(batch["latent"])
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    same = frechet_distance(metric, real[:24], real[24:])
    different = frechet_distance(metric, real[:24], noise[:24])
    assert 0 <= same < different / 5


@pytest.mark.ray
def test_evaluate_runs_shard_groups_on_ray_and_tracks_to_mlflow(tiny_model, demo_set, ray_local, tmp_path):
    import mlflow

    out = tmp_path / "eval" / "eval.json"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--model", str(tiny_model), "--data", f"{demo_set}/train", "--out", str(out), "--samples", "24",
            "--groups", "3", "--steps", "4", "--guidance-scales", "1,3,5:2", "--steps-sweep", "2,4", "--fid",
            "autoencoder", "--fid-floor", f"{demo_set}/val", "--tracking-uri", uri, "--storage-path", str(tmp_path)]
    assert evaluate_main(args) == 0
    report = json.loads(out.read_text())
    assert report["samples"] == 24 and report["demo_metrics"] is True
    assert [(r["guidance_scale_image"], r["guidance_scale_text"], r["steps"]) for r in report["results"]] == [
        (3.0, 1.0, 4), (1.0, 1.0, 4), (3.0, 3.0, 4), (5.0, 2.0, 4), (3.0, 1.0, 2)]  # the default first
    assert [(r["guidance_scale_image"], r["guidance_scale_text"]) for r in report["guidance_sweep"]] == [
        (3.0, 1.0), (1.0, 1.0), (3.0, 3.0), (5.0, 2.0)]
    assert [r["steps"] for r in report["steps_sweep"]] == [4, 2]
    best = report["best_guidance"]
    assert best["t2i"]["guidance_scale_image"] in (3.0, 1.0, 5.0) and best["i2t"]["guidance_scale_text"] in (3.0, 1.0, 2.0)
    t2i_means = [np.mean([r["metrics"][f"t2i_{k}"] for k in ("shape", "colour", "size", "position")])
                 for r in report["guidance_sweep"]]
    assert best["t2i"]["mean_accuracy"] == pytest.approx(max(t2i_means))
    for row in report["results"]:
        metrics = row["metrics"]
        for task in ("t2i", "i2t", "joint"):
            for key in ("shape", "colour", "size", "position", "all"):
                value, (low, high) = metrics[f"{task}_{key}"], row["intervals"][f"{task}_{key}"]
                assert 0 <= low <= value <= high <= 1
        low, high = row["intervals"]["infill_colour"]
        assert 0 <= low <= metrics["infill_colour"] <= high <= 1
        assert 0 <= metrics["bleu4"] <= 1 and 0 <= metrics["rougeL"] <= 1
        assert np.isfinite(metrics["fid"]) and metrics["fid"] >= 0
    assert Image.open(out.with_suffix(".png")).width > 100
    assert np.isfinite(report["fid_floor"]) and report["fid_floor"] > 0
    run = mlflow.MlflowClient(uri).get_run(report["mlflow_run_id"])
    assert run.data.metrics["t2i_all"] == report["default"]["metrics"]["t2i_all"]
    assert run.data.metrics["fid_floor"] == pytest.approx(report["fid_floor"])
    assert "t2i_all.w1-1_steps4" in run.data.metrics and "infill_colour.w5-2_steps4" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(report["mlflow_run_id"])}
    assert {"eval.json", "eval.png"} <= artifacts


def test_an_fid_floor_without_fid_is_refused_before_any_work(tiny_model, demo_set, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(tiny_model), "--data", f"{demo_set}/val", "--out", str(out), "--fid", "none",
                          "--fid-floor", f"{demo_set}/train", "--no-mlflow"]) == 2
    assert "--fid-floor needs FID features (FID not asked for (--fid none))" in capsys.readouterr().err
    assert not out.exists()


def test_the_fid_floor_of_a_set_against_itself_is_zero_and_against_other_images_is_not(tiny_model, demo_set):
    from jobs.evaluate import fid_floor
    from jobs.quality import AutoencoderFeatures, held_out_pairs
    from torchmetrics.image.fid import FrechetInceptionDistance

    pipe = load_pipeline(str(tiny_model))
    metric = FrechetInceptionDistance(feature=AutoencoderFeatures(pipe))
    real = pipe.decode_images(held_out_pairs(f"{demo_set}/val", 24)[1])
    results = [{"real_images": real, "per_setting": [{}]}]
    assert fid_floor(metric, pipe, results, f"{demo_set}/val", 8) == pytest.approx(0, abs=1e-3)
    assert fid_floor(metric, pipe, results, f"{demo_set}/train", 8) > 0.01
    with pytest.raises(ValueError, match="fewer than the 2400"):
        fid_floor(metric, pipe, [{"real_images": np.repeat(real, 100, axis=0), "per_setting": [{}]}],
                  f"{demo_set}/val", 64)


def test_each_setting_of_a_shard_group_reports_its_progress(tiny_model, demo_set, capsys):
    from jobs.quality import evaluate_group

    pipe = load_pipeline(str(tiny_model))
    settings = [SamplerSettings(steps=2), SamplerSettings(steps=3, guidance_scale_image=1)]
    group = evaluate_group(pipe, f"{demo_set}/val", 0, 2, 4, settings, demo=True, want_images=False, batch_size=4)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("quality: ")]
    assert len(group["per_setting"]) == 2 and len(group["references"]) == 4
    assert [re.sub(r"in \d+ s$", "in N s", line) for line in lines] == [
        "quality: shard group 1/2, setting 1/2 (2 steps, guidance 3:1): 4 samples in N s",
        "quality: shard group 1/2, setting 2/2 (3 steps, guidance 1:1): 4 samples in N s"]


@pytest.mark.ray
def test_evaluate_without_inception_weights_says_what_to_do(tiny_model, demo_set, ray_local, tmp_path, capsys):
    pytest.importorskip("torchmetrics")
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed; the offline message is not reachable")
    except ImportError:
        pass
    out = tmp_path / "eval.json"
    base = ["--model", str(tiny_model), "--data", f"{demo_set}/val", "--out", str(out), "--steps", "2",
            "--samples", "8", "--no-mlflow"]
    assert evaluate_main(base + ["--fid", "inception"]) == 2
    assert "--fid autoencoder" in capsys.readouterr().err and not out.exists()
    assert evaluate_main(base + ["--fid", "auto"]) == 0
    report = json.loads(out.read_text())
    assert report["fid_note"].startswith("FID skipped") and "fid" not in report["default"]["metrics"]
