"""Command line: `python -m dataprep demo ...` (built-in demo set end to end) and `encode ...` (real data).

Runs on an implicit local Ray instance, or on a cluster when RAY_ADDRESS is set / under `ray job submit`;
`--encoder-actors 0` encodes in this process without Ray (small sets).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dataprep.shapes import SCENES


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (train/, val/, words.bin, vae/)")
    parser.add_argument("--text-len", type=int, default=16, help="L: word slots per caption, end token included")
    parser.add_argument("--word-dim", type=int, default=32, help="E: word2vec vector size")
    parser.add_argument("--word-vectors", help="use this word2vec binary file instead of training one")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="share of source images held out in val/, every caption of an image on the same side "
                             "(a stable hash of the image); 0: no validation samples")
    parser.add_argument("--batch-size", type=int, default=64, help="autoencoder batch size")
    parser.add_argument("--encoder-actors", type=int, default=1,
                        help="autoencoder actors in the Ray Data pool; 0: encode in this process, without Ray")
    parser.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="encode on GPUs")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    """The command line: its sub-commands, their options and help."""
    parser = argparse.ArgumentParser(prog="dataprep", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="generate the demo set, train word2vec + a small VAE, write shards")
    _common(demo)
    demo.add_argument("--samples", type=int, default=4000)
    demo.add_argument("--resolution", type=int, default=32)
    demo.add_argument("--max-objects", type=int, choices=(1, 2), default=2, help="objects per image, at most")
    demo.add_argument("--scene", choices=SCENES, default="objects",
                      help="objects: one or two objects at absolute positions; relations: two objects and the "
                           "spatial relation between them (needs --max-objects 2)")
    demo.add_argument("--vae", help="reuse this autoencoder (folder or hub id) instead of training one")
    demo.add_argument("--vae-steps", type=int, default=1500)

    encode = commands.add_parser("encode", help="encode a real image+caption source into shards")
    _common(encode)
    encode.add_argument("--source", required=True,
                        help="coco:<root> | wds:<url or {000..009} pattern> | folder:<root>:<index.csv|.jsonl>")
    encode.add_argument("--resolution", type=int, default=256)
    vae = encode.add_mutually_exclusive_group(required=True)
    vae.add_argument("--vae", help="autoencoder: hub id (e.g. stabilityai/sd-vae-ft-mse) or local folder")
    vae.add_argument("--train-vae-steps", type=int, help="train a small autoencoder on the source's images")
    encode.add_argument("--vae-train-images", type=int, default=4096, help="images used to train a small VAE")
    return parser


def _use_gpu(choice: str, in_process: bool) -> bool:
    import ray

    gpus = torch.cuda.device_count() if in_process else ray.cluster_resources().get("GPU", 0)
    if choice == "yes" and not gpus:
        raise SystemExit(f"dataprep: --gpu yes but {'this machine' if in_process else 'the Ray cluster'} has no GPUs")
    return choice == "yes" or (choice == "auto" and gpus > 0)


def _source_images(spec: str, resolution: int, limit: int) -> np.ndarray:
    from dataprep import readers
    from psunet.progress import progress

    images = []
    with progress(total=limit, desc="vae images", unit="images") as bar:
        for item in readers.open_source(spec):
            if isinstance(item, readers.RawRecord):
                try:
                    images.append(readers.load_image(item, resolution))
                except readers.Skip:
                    continue
                bar.update()
            if len(images) >= limit:
                break
    if not images:
        raise SystemExit(f"dataprep: no readable images in {spec} to train an autoencoder on")
    return np.stack(images)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dataprep: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import ray

    from dataprep import shapes
    from dataprep.encode import EncodeSettings, build_shards, demo_units, source_captions, source_units
    from dataprep.vae import train_vae
    from dataprep.word2vec import prepare_word_vectors
    from psunet.autoencoder import Autoencoder
    from psunet.progress import progress

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.encoder_actors:
        ray.init(ignore_reinit_error=True)
    skipped: list[dict] = []

    if args.command == "demo":
        print(f"dataprep: generating {args.samples} demo samples ({args.scene}) at {args.resolution} px")
        samples = shapes.generate(args.samples, seed=args.seed, size=args.resolution, max_objects=args.max_objects,
                                  scene=args.scene)
        captions = [sample.caption for sample in samples]
        images = np.stack([sample.image for sample in samples])
        units = demo_units(args.samples, args.seed, args.resolution, args.max_objects, args.scene)
    else:
        captions = list(progress(source_captions(args.source), desc="captions", unit="captions"))
        images = None
        units = source_units(args.source, skipped)

    _, digest = prepare_word_vectors(captions, out / "words.bin", args.word_dim, given=args.word_vectors,
                                     seed=args.seed)
    print(f"dataprep: word vectors -> {out / 'words.bin'} (sha256 {digest[:12]}...)")

    vae_steps = args.vae_steps if args.command == "demo" else args.train_vae_steps
    if args.vae:
        autoencoder, is_local = args.vae, Path(args.vae).exists()
    else:
        if images is None:
            images = _source_images(args.source, args.resolution, args.vae_train_images)
        print(f"dataprep: training a small autoencoder on {len(images)} images for {vae_steps} steps")
        result = train_vae(images, str(out / "vae"), steps=vae_steps, seed=args.seed)
        print(f"dataprep: autoencoder -> {result['path']} (reconstruction MSE {result['reconstruction_mse']:.5f})")
        autoencoder, is_local = str(out / "vae"), True
    scaling_factor = Autoencoder.load(autoencoder).scaling_factor

    settings = EncodeSettings(
        out_dir=str(out), resolution=args.resolution, text_len=args.text_len, autoencoder=autoencoder,
        word_vectors=str(out / "words.bin"), word_vectors_sha256=digest, samples_per_shard=args.samples_per_shard,
        val_fraction=args.val_fraction, batch_size=args.batch_size, encoder_actors=args.encoder_actors,
        use_gpu=_use_gpu(args.gpu, in_process=not args.encoder_actors),
    )
    manifests = build_shards(units, settings, scaling_factor, skipped=skipped, autoencoder_is_local=is_local)
    summary = {split: {"samples": m.samples, "shards": len(m.shards)} for split, m in manifests.items()}
    summary["skipped"] = len(manifests["train"].skipped)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
