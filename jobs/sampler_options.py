"""The sampler's command-line options, shared by the jobs that sample (sample.py, evaluate.py), and the
comma-separated lists that sweeps of sampler settings take (evaluate.py, tune.py).

Their defaults, help and checks come from psunet.settings.SamplerSettings.
"""

from __future__ import annotations

import argparse

from psunet.settings import SamplerSettings


def add_sampler_options(parser: argparse.ArgumentParser) -> None:
    """The sampler's options; their defaults and help come from SamplerSettings."""
    fields = SamplerSettings.model_fields
    image, text = fields["guidance_scale_image"], fields["guidance_scale_text"]
    parser.add_argument("--guidance-scale", type=float, help=f"classifier-free guidance of both modalities "
                        f"(default: {image.default:g} image, {text.default:g} text)")
    for modality, field in (("image", image), ("text", text)):
        parser.add_argument(f"--guidance-scale-{modality}", type=float,
                            help=f"{field.description}; overrides --guidance-scale")
    for name, kind in (("steps", int), ("scheduler", str), ("spacing", str), ("seed", int)):
        parser.add_argument(f"--{name}", type=kind, default=fields[name].default,
                            help=f"{fields[name].description or name} (default: %(default)s)")
    interval = fields["guidance_interval"]
    parser.add_argument("--guidance-interval", type=float_pair, default=interval.default, metavar="LOW,HIGH",
                        help=f"{interval.description} (default: %(default)s)")
    parser.add_argument("--clamp-text", action=argparse.BooleanOptionalAction, default=fields["clamp_text"].default,
                        help=f"{fields['clamp_text'].description} (default: %(default)s)")
    parser.add_argument("--text-eta", type=float, default=fields["text_eta"].default,
                        help=f"{fields['text_eta'].description} (default: %(default)s)")


def sampler_settings(args) -> SamplerSettings:
    """The command line's sampler settings, checked (a ValueError names the field); a per-modality guidance
    scale wins over --guidance-scale, one not given keeps SamplerSettings' default."""
    scales = {"guidance_scale": args.guidance_scale, "guidance_scale_image": args.guidance_scale_image,
              "guidance_scale_text": args.guidance_scale_text}
    return SamplerSettings(steps=args.steps, scheduler=args.scheduler, spacing=args.spacing, seed=args.seed,
                           guidance_interval=args.guidance_interval, clamp_text=args.clamp_text,
                           text_eta=args.text_eta,
                           **{name: scale for name, scale in scales.items() if scale is not None})


def float_pair(text: str) -> tuple[float, float]:
    """"0.2,0.8" -> (0.2, 0.8)."""
    parts = [part for part in text.split(",") if part.strip()]
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers LOW,HIGH, got {text!r}") from None
    return low, high


def int_list(text: str) -> list[int]:
    """"10,25" -> [10, 25] (empty parts skipped)."""
    return [int(part) for part in text.split(",") if part.strip()]
