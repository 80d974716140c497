"""Sample grids and demo-data quality scores, shared by training validation, evaluation, tuning and benchmarks.

Text->image accuracy: the attribute reader reads each generated image and is scored against the
prompt's attributes. Image->text accuracy: each generated caption is parsed and scored against
the true caption's attributes. Positions are absolute, or relative for relation captions
(dataprep.shapes.score_image, score_caption). Held-out samples of a shard folder are scored per shard
group (evaluate_group) and combined into one row of metrics with 95 % intervals per sampler setting
(combine); any data also gets BLEU-4 / ROUGE-L of captions and, given a feature extractor, FID.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dataprep import shapes
from psunet.data import ShardStream
from psunet.pipeline import PSUNetPipeline
from psunet.settings import SamplerSettings
from psunet.text import BLANK


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]} if scores else {}


def text_to_image_accuracy(pipe: PSUNetPipeline, prompts: list[str], settings: SamplerSettings
                           ) -> tuple[dict[str, float], np.ndarray]:
    images, _ = pipe.text_to_image(prompts, settings)
    scores = [shapes.score_image(image, prompt) for image, prompt in zip(images, prompts)]
    return mean_scores(scores), images


def score_caption(generated: str, truth: str) -> dict[str, float]:
    """A generated caption against the true one, attribute by attribute, and whether it is a sentence of the data
    set's grammar (well_formed)."""
    return {**shapes.score_caption(generated, truth), "well_formed": float(shapes.is_well_formed(generated))}


def image_to_text_accuracy(pipe: PSUNetPipeline, latents, true_captions: list[str], settings: SamplerSettings
                           ) -> tuple[dict[str, float], list[str]]:
    """Captions for known image latents, scored against the true captions (score_caption)."""
    captions = pipe.captions_for_latents(latents, settings)
    scores = [score_caption(generated, truth) for generated, truth in zip(captions, true_captions)]
    return mean_scores(scores), captions


def grid_png(images: np.ndarray, labels: list[str], path: str | Path, scale: int = 4, columns: int = 4) -> Path:
    """A contact sheet: each (H, W, 3) uint8 image enlarged `scale` times with its label underneath."""
    count, height, width = images.shape[0], images.shape[1] * scale, images.shape[2] * scale
    label_height, cell_width = 28, max(width, 160)
    rows = math.ceil(count / columns)
    sheet = Image.new("RGB", (columns * cell_width, rows * (height + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * cell_width, (i // columns) * (height + label_height)
        sheet.paste(Image.fromarray(image).resize((width, height), Image.NEAREST), (x + (cell_width - width) // 2, y))
        words = label.split()
        lines = [" ".join(words[: len(words) // 2 + 1]), " ".join(words[len(words) // 2 + 1:])] \
            if len(label) > 26 else [label]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + height + 2 + 12 * j), line, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


@torch.no_grad()
def guidance_sweep(pipe: PSUNetPipeline, prompts: list[str], latents: torch.Tensor, scales: list[float],
                   settings: SamplerSettings, batch_size: int = 128) -> dict[str, dict]:
    """Text->image and image->text accuracy of held-out (caption, latent) pairs at every guidance scale, in
    batched sampler runs (each row its own scale and seed: prompt i has seed settings.seed + i at every scale,
    so the scale is the only difference); each direction's best scale by mean attribute accuracy.

    Returns {"t2i": {"by_scale": {scale: accuracies}, "best_scale", "best"}, "i2t": {...}}."""
    rows = [(scale, i) for scale in scales for i in range(len(prompts))]
    t2i, i2t = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        seeds = [settings.seed + i for _, i in chunk]
        guidance = [scale for scale, _ in chunk]
        chunk_prompts = [prompts[i] for _, i in chunk]
        images = pipe.infill(prompts=chunk_prompts, settings=settings, seeds=seeds, guidance_scales=guidance).images
        t2i += [shapes.score_image(image, prompt) for image, prompt in zip(images, chunk_prompts)]
        out = pipe.sample(len(chunk), settings, seeds, guidance, image_known=latents[[i for _, i in chunk]].to(pipe.device))
        i2t += [shapes.score_caption(caption, prompt)
                for caption, prompt in zip(pipe.codec.decode(out.text_vectors), chunk_prompts)]
    result = {}
    for task, scores in (("t2i", t2i), ("i2t", i2t)):
        by_scale = {}
        for k, scale in enumerate(scales):
            accuracy = mean_scores(scores[k * len(prompts):(k + 1) * len(prompts)])
            by_scale[scale] = {**accuracy, "mean": float(np.mean([accuracy[a] for a in shapes.ATTRIBUTES]))}
        best = max(by_scale, key=lambda scale: by_scale[scale]["mean"])
        result[task] = {"by_scale": by_scale, "best_scale": best, "best": by_scale[best]["mean"]}
    return result


def sweep_metrics(sweep: dict) -> dict[str, float]:
    """A guidance_sweep's result as flat metrics: per direction its best accuracy, the scale it was reached at,
    and its accuracy at every scale (t2i_accuracy, t2i_guidance, t2i_accuracy_w<scale>, i2t_...)."""
    metrics = {}
    for task in ("t2i", "i2t"):
        metrics.update({f"{task}_accuracy": sweep[task]["best"], f"{task}_guidance": sweep[task]["best_scale"],
                        **{f"{task}_accuracy_w{scale:g}": value["mean"]
                           for scale, value in sweep[task]["by_scale"].items()}})
    return metrics


DEMO_TASKS = ("t2i", "i2t", "infill", "joint")


def wilson_interval(fraction: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion measured on `count` samples."""
    if count == 0:
        return 0.0, 1.0
    centre = (fraction + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(fraction * (1 - fraction) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return max(0.0, centre - half), min(1.0, centre + half)


def held_out_captions(data: str, count: int) -> list[str]:
    """The first `count` captions of a shard folder, in order."""
    return [item["caption"] for _, item in zip(range(count), ShardStream(data, training=False))]


def held_out_pairs(data: str, count: int) -> tuple[list[str], torch.Tensor]:
    """The first `count` (caption, image latent) pairs of a shard folder, in order: captions and (N, C, h, w)."""
    items = [item for _, item in zip(range(count), ShardStream(data, training=False))]
    if not items:
        raise ValueError(f"no held-out samples in {data}")
    return [item["caption"] for item in items], torch.stack([item["latent"] for item in items])


def is_demo_data(captions: list[str]) -> bool:
    """True when every caption names at least one object with all its attributes."""
    parsed = [shapes.parse_caption(caption) for caption in captions]
    return bool(parsed) and all(objects and all(None not in (o.shape, o.colour, o.size, o.position)
                                                for o in objects) for objects in parsed)


class AutoencoderFeatures(torch.nn.Module):
    """FID features from the model's own VAE encoder: the flattened latent means of uint8 images."""

    def __init__(self, pipe: PSUNetPipeline):
        super().__init__()
        self.autoencoder = pipe.autoencoder
        self.num_features = int(np.prod(pipe.model_config.latent_shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float() / 127.5 - 1
        return self.autoencoder.encode(pixels.to(self.autoencoder.device)).flatten(1).cpu().double()


def blank_colour(caption: str) -> str | None:
    """The caption with its first colour word replaced by [?] (None when it names no colour)."""
    words = caption.split()
    for i, word in enumerate(words):
        if word in shapes.COLOURS:
            return " ".join(words[:i] + [BLANK] + words[i + 1:])
    return None


def evaluate_group(pipe: PSUNetPipeline, data: str, group: int, groups: int, limit: int, settings: list[SamplerSettings],
                   demo: bool, want_images: bool, batch_size: int) -> dict:
    """Samples and per-sample scores for one shard group, for every setting."""
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    stream = ShardStream(data, pipe.model_config, training=False, rank=group, world_size=groups)
    items = []
    for item in stream:
        if len(items) >= limit:
            break
        items.append(item)
    if not items:
        return {"references": [], "real_images": None, "per_setting": [], "skipped": len(stream.errors)}
    references = [item["caption"] for item in items]
    latents = torch.stack([item["latent"] for item in items])
    batches = [slice(start, start + batch_size) for start in range(0, len(items), batch_size)]
    real = decode_in_batches(pipe, latents, batch_size) if want_images else None
    per_setting, joint_pairs = [], {}
    for number, setting in enumerate(settings, 1):
        started = time.perf_counter()
        t2i_images, captions, filled = [], [], []
        # joint pairs have nothing known, so no guidance: settings that differ only in guidance share them
        unguided = setting.with_guidance(1.0)
        if demo and unguided not in joint_pairs:
            pairs = [pipe.generate(len(references[b]), setting) for b in batches]
            joint_pairs[unguided] = np.concatenate([p[0] for p in pairs]), [c for p in pairs for c in p[1]]
        for b in batches:
            t2i_images.append(pipe.text_to_image(references[b], setting)[0])
            captions += pipe.captions_for_latents(latents[b], setting)
            if demo:
                filled += pipe.captions_for_latents(latents[b], setting, prompts=[blank_colour(r) for r in references[b]])
        t2i_images = np.concatenate(t2i_images)
        result = {"captions": captions, "t2i_images": t2i_images if want_images else None}
        if demo:
            result["t2i"] = [shapes.score_image(image, r) for image, r in zip(t2i_images, references)]
            result["i2t"] = [score_caption(c, r) for c, r in zip(captions, references)]
            result["infill"] = [{"colour": float(shapes.score_caption(c, r)["colour"])}
                                for c, r in zip(filled, references)]
            result["joint"] = [shapes.score_image(image, caption) for image, caption in zip(*joint_pairs[unguided])]
        per_setting.append(result)
        print(f"quality: shard group {group + 1}/{groups}, setting {number}/{len(settings)} ({setting.steps} steps, "
              f"guidance {setting.guidance_scale_image:g}:{setting.guidance_scale_text:g}): {len(items)} samples in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return {"references": references, "real_images": real, "per_setting": per_setting,
            "skipped": len(stream.errors)}


def decode_in_batches(pipe: PSUNetPipeline, latents: torch.Tensor, batch_size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) images of (N, C, h, w) latents, decoded batch_size at a time."""
    return np.concatenate([pipe.decode_images(latents[start:start + batch_size])
                           for start in range(0, len(latents), batch_size)])


def reference_images(groups: list[dict]) -> np.ndarray:
    """The held-out images of every shard group that had samples, in group order: FID's references."""
    return np.concatenate([g["real_images"] for g in groups if g["per_setting"]])


def caption_scores(captions: list[str], references: list[str]) -> dict[str, float]:
    from torchmetrics.text import BLEUScore, ROUGEScore

    bleu = BLEUScore(n_gram=4, smooth=True)(captions, [[reference] for reference in references])
    rouge = ROUGEScore(rouge_keys=("rougeL",))(captions, references)["rougeL_fmeasure"]
    return {"bleu4": float(bleu), "rougeL": float(rouge)}


def frechet_distance(metric, real: np.ndarray, fake: np.ndarray, batch_size: int = 64) -> float:
    metric.reset()
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            metric.update(torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).contiguous(),
                          real=is_real)
    return float(metric.compute())


def combine(groups: list[dict], settings: list[SamplerSettings], demo: bool, fid) -> list[dict]:
    """One row per setting: metric values and 95 % intervals over all groups' samples."""
    groups = [g for g in groups if g["per_setting"]]
    references = [ref for g in groups for ref in g["references"]]
    real = reference_images(groups) if fid is not None else None
    rows = []
    for index, setting in enumerate(settings):
        parts = [g["per_setting"][index] for g in groups]
        metrics, intervals = caption_scores([c for p in parts for c in p["captions"]], references), {}
        if demo:
            for task in DEMO_TASKS:
                scores = [s for p in parts for s in p[task]]
                for key, value in mean_scores(scores).items():
                    metrics[f"{task}_{key}"] = value
                    intervals[f"{task}_{key}"] = list(wilson_interval(value, len(scores)))
        if fid is not None:
            metrics["fid"] = frechet_distance(fid, real, np.concatenate([p["t2i_images"] for p in parts]))
        rows.append({**setting.model_dump(exclude={"seed"}), "metrics": metrics, "intervals": intervals})
    return rows


def best_guidance(rows: list[dict]) -> dict:
    """Each direction's best row of the guidance sweep: text->image by guidance_scale_image (mean of its
    attribute accuracies), image->text by guidance_scale_text. A direction's score depends only on its own
    modality's scale (the other modality is known), so the best pair is the two bests together."""
    best = {}
    for task, scale in (("t2i", "guidance_scale_image"), ("i2t", "guidance_scale_text")):
        def mean_accuracy(row: dict) -> float:
            return float(np.mean([row["metrics"][f"{task}_{key}"] for key in shapes.ATTRIBUTES]))

        top = max(rows, key=mean_accuracy)
        keys = (*shapes.ATTRIBUTES, "all", *(("well_formed",) if task == "i2t" else ()))
        best[task] = {scale: top[scale], "mean_accuracy": mean_accuracy(top),
                      **{key: top["metrics"][f"{task}_{key}"] for key in keys}}
    return best


def demo_sweep(pipe: PSUNetPipeline, data: str, samples: int, settings: list[SamplerSettings], batch_size: int
               ) -> tuple[list[dict], dict, float]:
    """The first `samples` held-out demo samples at every setting of a guidance sweep: the rows (combine), each
    direction's best (best_guidance) and FID with the autoencoder's features at the best text->image scale."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    group = evaluate_group(pipe, data, 0, 1, samples, settings, demo=True, want_images=True, batch_size=batch_size)
    rows = combine([group], settings, True, None)
    best = best_guidance(rows)
    at = [row["guidance_scale_image"] for row in rows].index(best["t2i"]["guidance_scale_image"])
    fid = frechet_distance(FrechetInceptionDistance(feature=AutoencoderFeatures(pipe)), group["real_images"],
                           group["per_setting"][at]["t2i_images"])
    return rows, best, fid
