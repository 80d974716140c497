"""Sample from a trained model: every joint-infilling task from the command line, as one batch.

    python jobs/sample.py --model MODEL --out DIR --prompt "a small red circle on the left"  # text -> image
    python jobs/sample.py --model MODEL --out DIR --image shape.png                         # image -> text
    python jobs/sample.py --model MODEL --out DIR --generate 16                             # joint pairs
    python jobs/sample.py --model MODEL --out DIR --prompt "a [?] circle on the [?]"        # fill the blanks
    python jobs/sample.py --model MODEL --out DIR --image shape.png --mask mask.png         # image region
    python jobs/sample.py --model MODEL --out DIR --image shape.png --mask mask.png --prompt "a [?] square"
    python jobs/sample.py --model MODEL --out DIR --prompt "a small red circle" --paint red=0,0,16,32  # paint

--paint WORD=REGION (repeatable) steers a prompt word (the word, or its index in the prompt) into a
region: a box x0,y0,x1,y1 in pixels (end exclusive) or a mask image (white = the word goes here),
for every prompt; --paint-weight and --paint-fraction set the bias strength and the share of steps.

--guidance-scale sets the classifier-free guidance of both modalities; --guidance-scale-image (how
strongly a known caption steers the image) and --guidance-scale-text (how strongly a known image
steers the caption) set one each, overriding --guidance-scale for it. --spacing spreads the steps over
the training times. Defaults and checks: psunet.settings.SamplerSettings.

MODEL is a checkpoint or model folder, or an MLflow URI: runs:/<run id>/model or models:/<name>/<version>.
A mask is an image the size of its image: white (>= 128) marks pixels to generate, black pixels
are kept exactly. One --image or --mask is used for every prompt; otherwise counts must match.
Images must be at the model's resolution; --resize centre-crops and resizes them (and their
masks) instead of refusing. Writes sample_NNN.png, captions.txt, samples.json and
contact_sheet.png into DIR, all at once: on an error nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from jobs.model_ref import MODEL_HELP, load_pipeline  # noqa: E402
from jobs.quality import grid_png  # noqa: E402
from jobs.sampler_options import add_sampler_options, sampler_settings  # noqa: E402
from psunet.paint import box_region  # noqa: E402
from psunet.progress import progress  # noqa: E402
from psunet.settings import SamplerSettings  # noqa: E402


def read_image(path: str, size: int, resize: bool, mode: str = "RGB") -> np.ndarray:
    """(size, size, 3) uint8 (or (size, size) for mode "L"); wrong sizes refused unless `resize`."""
    try:
        with Image.open(path) as opened:
            image = opened.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    if image.size != (size, size):
        if not resize:
            raise ValueError(f"{path}: image is {image.size[0]}x{image.size[1]}, the model needs {size}x{size} "
                             f"(pass --resize to centre-crop and resize)")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((size, size), Image.NEAREST if mode == "L" else Image.LANCZOS)
    return np.asarray(image)


def read_images(paths: list[str], size: int, resize: bool) -> np.ndarray | None:
    """The input images as one (N, size, size, 3) uint8 array; None without any."""
    if not paths:
        return None
    return np.stack([read_image(path, size, resize) for path in progress(paths, desc="sample: read", unit="images")])


def read_mask(path: str, image_path: str, size: int, resize: bool) -> np.ndarray:
    """(size, size) bool, True = generate; the mask must have its image's size."""
    try:
        with Image.open(image_path) as image, Image.open(path) as mask:
            if mask.size != image.size:
                raise ValueError(f"{path}: mask is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                                 f"{image.size[0]}x{image.size[1]}")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"mask file not found: {exc.filename}") from None
    except UnidentifiedImageError as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    return read_image(path, size, resize, mode="L") >= 128


def read_paint(spec: str, size: int, resize: bool) -> tuple[int | str, np.ndarray]:
    """WORD=x0,y0,x1,y1 or WORD=mask.png -> (word or index, (size, size) bool region)."""
    word, sep, region_spec = spec.partition("=")
    if not sep or not word or not region_spec:
        raise ValueError(f"--paint {spec!r} must look like WORD=x0,y0,x1,y1 or WORD=mask.png")
    word = int(word) if word.isdigit() else word
    box = region_spec.split(",")
    if len(box) == 4 and all(v.strip().isdigit() for v in box):
        try:
            return word, box_region([int(v) for v in box], size)
        except ValueError as exc:
            raise ValueError(f"--paint {spec!r}: {exc}") from None
    return word, read_image(region_spec, size, resize, mode="L") >= 128


def broadcast(name: str, values: list, count: int) -> list:
    if len(values) in (0, count):
        return values
    if len(values) == 1:
        return values * count
    raise ValueError(f"{name}: {len(values)} given for a batch of {count}; give 1 or {count}")


def plan(args) -> dict:
    """Check every input and return what infill needs, before anything is loaded or written."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if args.generate is not None and (prompts or args.image):
        raise ValueError("--generate makes unconditional pairs; it cannot be combined with --prompt or --image")
    if args.mask and not args.image:
        raise ValueError("--mask needs --image")
    if args.mask and len(args.mask) not in (1, len(args.image)):
        raise ValueError(f"--mask: {len(args.mask)} masks for {len(args.image)} images; give 1 or {len(args.image)}")
    if args.generate is None and not prompts and not args.image:
        raise ValueError("nothing to sample: give --prompt, --prompts-file, --image or --generate N")
    if args.generate is not None and not 1 <= args.generate <= args.max_batch:
        raise ValueError(f"--generate must be in [1, {args.max_batch}], got {args.generate}")
    count = args.generate or max(len(prompts), len(args.image or []))
    if count > args.max_batch:
        raise ValueError(f"{count} samples in one batch is more than --max-batch {args.max_batch}")
    images = broadcast("--image", list(args.image or []), count)
    masks = broadcast("--mask", list(args.mask or []), len(images))
    return {"count": count, "prompts": broadcast("--prompt", prompts, count), "images": images, "masks": masks}


def output_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")


def write_results(out: Path, result, job: dict, settings: SamplerSettings, meta: dict) -> None:
    """Everything into a hidden sibling folder first, then renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    records = []
    pairs = progress(zip(result.images, result.captions), total=len(result.captions), desc="sample: write",
                     unit="samples")
    for i, (image, caption) in enumerate(pairs):
        name = f"sample_{i:03d}.png"
        Image.fromarray(image).save(partial / name)
        records.append({"image": name, "caption": caption,
                        "prompt": job["prompts"][i] if job["prompts"] else None,
                        "input_image": job["images"][i] if job["images"] else None,
                        "mask": job["masks"][i] if job["masks"] else None,
                        "unknown_words": result.unknown_words[i]})
    (partial / "captions.txt").write_text("".join(caption + "\n" for caption in result.captions))
    (partial / "samples.json").write_text(json.dumps(
        {**meta, "settings": settings.model_dump(), "network_evaluations": result.network_evaluations,
         "samples": records}, indent=2))
    grid_png(result.images, result.captions, partial / "contact_sheet.png")
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(partial, out)


def build_parser() -> argparse.ArgumentParser:
    """The command line: its options and their help."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--prompt", action="append", help="a caption; [?] marks a word to fill in (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line")
    parser.add_argument("--image", action="append", help="an image file (repeatable)")
    parser.add_argument("--mask", action="append", help="a mask per image: white = generate (repeatable)")
    parser.add_argument("--generate", type=int, help="this many unconditional (image, caption) pairs")
    parser.add_argument("--paint", action="append", help="WORD=x0,y0,x1,y1 or WORD=mask.png: paint-with-words")
    parser.add_argument("--paint-weight", type=float, default=1.0, help="paint-with-words strength w")
    parser.add_argument("--paint-fraction", type=float, default=1.0, help="share of the steps with the bias")
    add_sampler_options(parser)
    parser.add_argument("--weights", default="ema", choices=["ema", "model"])
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the denoiser's precision; bf16 is faster on GPUs and on CPUs with native bf16")
    parser.add_argument("--resize", action="store_true", help="centre-crop and resize images of another size")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--max-batch", type=int, default=256, help="most samples in one call")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ references")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        job = plan(args)
        output_folder(out, args.overwrite)
        # checked before the model loads; the sampler checks the steps against the model's schedule too
        settings = sampler_settings(args)
        pipe = load_pipeline(args.model, weights=args.weights, device=args.device, tracking_uri=args.tracking_uri,
                             precision=args.precision)
        size = pipe.resolution
        images = read_images(job["images"], size, args.resize)
        masks = np.stack([read_mask(m, i, size, args.resize) for m, i in zip(job["masks"], job["images"])]) \
            if job["masks"] else None
        if args.paint and not job["prompts"]:
            raise ValueError("--paint needs --prompt: it steers where a prompt's words go")
        paint = [[read_paint(spec, size, args.resize) for spec in args.paint]] * job["count"] if args.paint \
            else None
        print(f"sample: {job['count']} sample(s) in one batch, {settings.describe()}, on {pipe.device}", flush=True)
        started = time.perf_counter()
        result = pipe.infill(prompts=job["prompts"] or None, images=images, image_masks=masks,
                             count=args.generate, settings=settings, paint=paint,
                             paint_weight=args.paint_weight, paint_fraction=args.paint_fraction)
        seconds = time.perf_counter() - started
        for i, words in enumerate(result.unknown_words):
            if words:
                print(f"sample: prompt {i}: not in the vocabulary, sampled as <unk>: {', '.join(words)}",
                      file=sys.stderr)
        paint_meta = {"paint": args.paint, "paint_weight": args.paint_weight,
                      "paint_fraction": args.paint_fraction} if args.paint else {}
        write_results(out, result, job, settings, {"model": args.model, "weights": args.weights,
                                                   "seconds": round(seconds, 3), **paint_meta})
    except (ValueError, FileNotFoundError) as exc:
        print(f"sample: error: {exc}", file=sys.stderr)
        return 2
    print(f"sample: wrote {len(result.captions)} sample(s) in {seconds:.1f} s -> {out} "
          f"(contact_sheet.png, captions.txt, samples.json)", flush=True)
    for caption in result.captions[:8]:
        print(f"  {caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
