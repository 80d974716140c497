"""Evaluate a trained model on held-out shards with Ray: one task per shard group (a GPU each when present).

    python jobs/evaluate.py --model MODEL --data data/demo/val --out runs/eval.json \
        --guidance-scales 1,3,5 --steps-sweep 10,25

Metrics for every sampler setting (the default, each --guidance-scales value at the default steps: a
number sets both modalities' scales, image:text a pair; each --steps-sweep value at the default guidance):
  - demo data (captions the attribute reader understands, detected automatically): text->image and
    image->text attribute accuracy (per attribute and all-correct), caption infilling (the colour word
    blanked, the image given: is the filled word the image's colour) and the joint coherence of
    unconditional pairs (the image read back agrees with its own caption), each with a 95 % Wilson
    interval from the number of samples, the best guidance scale of each direction, and each attribute's
    chance level (`chance`; positions relative to each other in the relations set);
  - any data: BLEU-4 and ROUGE-L of image->text captions against the references (torchmetrics), and
    FID (torchmetrics FrechetInceptionDistance) of text->image images against the autoencoder's
    reconstructions of the held-out latents. --fid picks the feature extractor: inception (needs
    torch-fidelity and its weights), autoencoder (the model's own VAE encoder, offline; comparable
    only between models sharing that VAE), a TorchScript file mapping uint8 (N, 3, H, W) to
    (N, D) features, none, or auto (inception when it loads, otherwise FID is skipped with a note).
    --fid-floor SHARDS also scores the reconstructions of as many samples of another shard set (the
    training set, say) against the same references: what two real sets of this size score, the
    estimator's own floor (`fid_floor`), below which a model's FID difference is noise.
Results go to the JSON file, a plot PNG of metric vs guidance scale beside it, and an MLflow run
(--tracking-uri, else $MLFLOW_TRACKING_URI, else the local store in runs/).
The shard folder must be readable from every node (a shared volume on a cluster).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dataprep import shapes  # noqa: E402
from jobs.model_ref import MODEL_HELP, load_pipeline  # noqa: E402
from jobs.quality import (AutoencoderFeatures, best_guidance, combine, decode_in_batches, evaluate_group,  # noqa: E402
                          frechet_distance, held_out_captions, held_out_pairs, is_demo_data, reference_images)
from jobs.sampler_options import add_sampler_options, int_list, sampler_settings  # noqa: E402
from jobs import tracking  # noqa: E402
from jobs.tracking import tracking_uri  # noqa: E402
from psunet.data import load_manifest  # noqa: E402
from psunet.pipeline import PSUNetPipeline  # noqa: E402
from psunet.progress import progress  # noqa: E402
from psunet.settings import SamplerSettings  # noqa: E402
from psunet.settings import parse_guidance  # noqa: E402


def fid_metric(choice: str, pipe: PSUNetPipeline):
    """(a FrechetInceptionDistance or None, a note on what was used or why FID is skipped)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if choice == "none":
        return None, "FID not asked for (--fid none)"
    if choice == "autoencoder":
        return FrechetInceptionDistance(feature=AutoencoderFeatures(pipe)), "FID features: the model's autoencoder"
    if choice in ("inception", "auto"):
        try:
            return FrechetInceptionDistance(feature=2048), "FID features: Inception v3 (pool3, 2048)"
        except Exception as exc:  # missing torch-fidelity, or weights that cannot be downloaded offline
            message = (f"Inception features unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                       "install torch-fidelity with its weights cached, or pass --fid autoencoder or "
                       "--fid extractor.pt (TorchScript: uint8 (N, 3, H, W) -> (N, D))")
            if choice == "inception":
                raise ValueError(f"--fid inception: {message}") from exc
            return None, f"FID skipped: {message}"
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(f"--fid: {choice!r} is not inception, autoencoder, auto, none or a TorchScript file")
    size = pipe.resolution
    extractor = torch.jit.load(str(path), map_location="cpu").eval()
    return FrechetInceptionDistance(feature=extractor, input_img_size=(3, size, size)), f"FID features: {path.name}"


def sweep_settings(base: SamplerSettings, guidance_scales: list, steps_sweep: list[int]) -> list[SamplerSettings]:
    """The default setting first, then the guidance sweep at default steps and the steps sweep, no repeats."""
    candidates = [base] + [base.with_guidance(scale) for scale in guidance_scales] \
        + [base.model_copy(update={"steps": n}) for n in steps_sweep]
    unique: list[SamplerSettings] = []
    for setting in candidates:
        if setting not in unique:
            unique.append(setting)
    return unique


def plot_guidance(rows: list[dict], base: SamplerSettings, path: Path) -> Path | None:
    """Metric vs guidance scale at the default steps; one panel per metric family, each against the scale
    of the modality it generates (the image's for text->image and FID, the text's for image->text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted((r for r in rows if r["steps"] == base.steps),
                   key=lambda r: (r["guidance_scale_image"], r["guidance_scale_text"]))
    if len(sweep) < 2:
        return None
    metrics = sweep[0]["metrics"]
    families = {"text->image": ([k for k in metrics if k.startswith("t2i_")], "image"),
                "image->text": ([k for k in metrics if k.startswith(("i2t_", "infill_")) or k in ("bleu4", "rougeL")],
                                "text"),
                "FID": ([k for k in metrics if k == "fid"], "image")}
    families = {name: family for name, family in families.items() if family[0]}
    figure, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for axis, (name, (keys, modality)) in zip(axes[0], families.items()):
        scales = [r[f"guidance_scale_{modality}"] for r in sweep]
        for key in keys:
            axis.plot(scales, [r["metrics"][key] for r in sweep], marker="o", label=key)
        axis.set_title(name)
        axis.set_xlabel(f"{modality} guidance scale")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def log_to_mlflow(uri: str, experiment: str, report: dict, files: list[Path], storage: str) -> str:
    client = tracking.client(uri)
    params = {"model": report["model"], "data": report["data"], "precision": report["precision"],
              "samples": report["samples"],
              **{key: report["default"][key] for key in ("scheduler", "spacing", "steps", "guidance_scale_image",
                                                        "guidance_scale_text")},
              "fid": report["fid_note"]}
    run_id = tracking.create_run(client, experiment, storage, f"evaluate-{Path(report['model'].rstrip('/')).name}",
                                 params=params)
    points = [(f"{key}.w{row['guidance_scale_image']:g}-{row['guidance_scale_text']:g}_steps{row['steps']}", value, 0)
              for row in report["results"] for key, value in row["metrics"].items()]
    floor = {"fid_floor": report["fid_floor"]} if report["fid_floor"] is not None else {}
    tracking.log_metrics(client, run_id, {**report["default"]["metrics"], **floor}, points=points)
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def run(args) -> dict:
    import ray

    base = sampler_settings(args)
    settings = sweep_settings(base, args.guidance_scales, args.steps_sweep)
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    manifest = load_manifest(args.data)
    pipe = load_pipeline(args.model, weights=args.weights, device="cpu", tracking_uri=args.tracking_uri,
                         precision=args.precision)
    manifest.check_model(pipe.model_config)
    for setting in settings:
        setting.check_for(pipe.diffusion_config.num_train_timesteps)
    fid, fid_note = fid_metric(args.fid, pipe)
    if args.fid_floor and fid is None:
        raise ValueError(f"--fid-floor needs FID features ({fid_note})")
    print(f"evaluate: {fid_note}", flush=True)
    held_out = held_out_captions(args.data, 64)
    demo = is_demo_data(held_out)
    groups = max(1, min(args.groups or len(manifest.shards), len(manifest.shards)))
    per_group = math.ceil(min(args.samples, manifest.samples) / groups)
    ray.init(ignore_reinit_error=True)
    use_gpu = bool(ray.cluster_resources().get("GPU"))
    task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(evaluate_group)
    print(f"evaluate: {len(settings)} setting(s) x up to {per_group * groups} samples in {groups} shard group(s)"
          f"{' on GPUs' if use_gpu else ''}; demo metrics {'on' if demo else 'off'}", flush=True)
    started = time.perf_counter()
    pipe_ref = ray.put(pipe)
    pending = [task.remote(pipe_ref, str(Path(args.data).resolve()), g, groups, per_group, settings, demo,
                           fid is not None, args.batch_size) for g in range(groups)]
    results = []
    with progress(total=groups, desc="evaluate", unit="shard groups", delay=0) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results += ray.get(done)
            bar.update(len(done))
    samples = sum(len(r["references"]) for r in results)
    if samples == 0:
        raise ValueError(f"no readable samples in {args.data}")
    rows = combine(results, settings, demo, fid)
    guidance_sweep = [r for r in rows if r["steps"] == base.steps]
    floor = fid_floor(fid, pipe, results, args.fid_floor, args.batch_size) if args.fid_floor else None
    return {"model": args.model, "data": str(args.data), "precision": args.precision, "samples": samples,
            "demo_metrics": demo, "chance": shapes.CHANCE[shapes.scene_of(held_out[0])] if demo else None,
            "skipped": sum(r["skipped"] for r in results), "fid_note": fid_note,
            "seconds": round(time.perf_counter() - started, 1), "default": rows[0], "results": rows,
            "guidance_sweep": guidance_sweep,
            "steps_sweep": [r for r in rows if (r["guidance_scale_image"], r["guidance_scale_text"]) == base.guidance],
            "best_guidance": best_guidance(guidance_sweep) if demo else None, "fid_floor": floor}


def fid_floor(fid, pipe: PSUNetPipeline, results: list[dict], other: str, batch_size: int) -> float:
    """FID of the reconstructions of as many samples of the shard set `other` against the held-out ones."""
    real = reference_images(results)
    _, latents = held_out_pairs(other, len(real))
    if len(latents) < len(real):
        raise ValueError(f"--fid-floor: {other} has {len(latents)} readable samples, fewer than the {len(real)} "
                         "held-out ones it is compared with")
    return frechet_distance(fid, real, decode_in_batches(pipe, latents, batch_size))


def print_table(report: dict) -> None:
    keys = [k for k in report["default"]["metrics"]
            if k.split("_", 1)[-1] in ("shape", "colour", "all") or k in ("bleu4", "rougeL", "fid")]
    print("evaluate: " + "  ".join(["w_image", "w_text", "steps", *keys]))
    for row in report["results"]:
        values = [f"{row['metrics'][k]:.3f}" for k in keys]
        print("evaluate: " + "  ".join([f"{row['guidance_scale_image']:7g}", f"{row['guidance_scale_text']:6g}",
                                        f"{row['steps']:5d}", *values]))
    if report.get("chance"):
        print("evaluate: chance per attribute: " + ", ".join(f"{k} {v:.3f}" for k, v in report["chance"].items()))
    for task, best in (report.get("best_guidance") or {}).items():
        print(f"evaluate: best {task}: " + ", ".join(f"{k} {v:.3g}" for k, v in best.items()))
    if report.get("fid_floor") is not None:
        print(f"evaluate: FID floor (two real sets of {report['samples']}): {report['fid_floor']:.3f}")


def build_parser() -> argparse.ArgumentParser:
    """The command line: its options and their help."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--data", required=True, help="held-out shard folder (with manifest.json)")
    parser.add_argument("--out", required=True, help="results JSON file (the plot PNG goes beside it)")
    parser.add_argument("--samples", type=int, default=256, help="held-out samples to use, at most")
    add_sampler_options(parser)
    parser.add_argument("--guidance-scales", type=parse_guidance, default=[],
                        help="sweep, e.g. 1,2,3,5,7 (both modalities) or 5:2 (image:text)")
    parser.add_argument("--steps-sweep", type=int_list, default=[], help="sweep, e.g. 10,25,50")
    parser.add_argument("--fid", default="auto", help="auto, inception, autoencoder, none or a TorchScript file")
    parser.add_argument("--fid-floor", metavar="SHARDS",
                        help="also score as many real samples of this shard set (e.g. the training set) as FID does")
    parser.add_argument("--groups", type=int, help="shard groups = Ray tasks (default: one per shard)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weights", default="ema", choices=["ema", "model"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the denoiser's precision")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else runs/)")
    parser.add_argument("--experiment", default="psunet-evaluate")
    parser.add_argument("--storage-path", default="runs", help="where the default MLflow store lives")
    parser.add_argument("--no-mlflow", action="store_true", help="write only the JSON file and the plot")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        report = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_guidance(report["results"], sampler_settings(args), out.with_suffix(".png"))
    report["plot"] = str(plot) if plot else None
    if not args.no_mlflow:
        uri = tracking_uri(args.tracking_uri, args.storage_path)
        out.write_text(json.dumps(report, indent=2))
        report["mlflow_run_id"] = log_to_mlflow(uri, args.experiment, report, [out] + ([plot] if plot else []),
                                                args.storage_path)
        report["mlflow_tracking_uri"] = uri
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"evaluate: {report['samples']} samples in {report['seconds']} s -> {out}"
          + (f", plot {plot}" if plot else "")
          + (f", MLflow run {report['mlflow_run_id']}" if "mlflow_run_id" in report else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
