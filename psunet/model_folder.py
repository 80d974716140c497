"""The model folder: a trained model on disk, written and read here only.

Laid out like a diffusers pipeline folder: `model_index.json` names the pipeline class and each
component (library, class), and every component has a sub-folder with its JSON config and weights:

    model_index.json                   {"_class_name": "PSUNetPipeline", "denoiser": ["psunet", "PSUNet"],
                                        "autoencoder": ["diffusers", "AutoencoderKL"], ...}
    denoiser/config.json               {"model": ModelConfig, "experts": {"intervals": [[start, end), ...]}}
    denoiser/diffusion_pytorch_model.safetensors   the EMA weights
    autoencoder/                       a diffusers AutoencoderKL as save_pretrained writes it (a model that uses a
                                       hub VAE names it in model_index.json's "_autoencoder_hub_id" instead)
    word_vectors/config.json           {"file": "words.bin", "sha256": ..., "vector_size": E}
    word_vectors/words.bin             word2vec binary format
    scheduler/scheduler_config.json    {"diffusion": DiffusionConfig, "sampler": the default SamplerSettings}
    training.json                      the step the weights were saved at (per expert for an ensemble), the job config

Training checkpoints (psunet.checkpoint) keep their flat layout (config.json, ema.safetensors,
model.safetensors, state.json) with an `assets.json` naming the shards' autoencoder and word vectors;
`locate` reads both, so a checkpoint samples like a model folder and folders written before this
layout still load; `python -m psunet.model_folder OLD NEW` rewrites either in this layout.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from gensim.models import KeyedVectors
from safetensors.torch import load_file

from psunet.checkpoint import load_state, save_weights
from psunet.config import DiffusionConfig, ModelConfig
from psunet.data import load_manifest
from psunet.experts import ExpertEnsemble, check_intervals
from psunet.model import PSUNet
from psunet.text import TextCodec, file_sha256, load_vectors

MODEL_INDEX = "model_index.json"
ASSETS = "assets.json"  # a training checkpoint's pointers to its autoencoder and word vectors
WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"
TRAINING = "training.json"
SOURCES = "psunet.model_sources"  # entry-point group of installed resolvers for model URIs
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


@dataclass
class ModelFiles:
    """Where the parts of a model folder or a training checkpoint are."""

    folder: Path
    config: dict  # "model", "diffusion", and "experts" for an ensemble
    weights: Path
    autoencoder: Path | str | None  # a local diffusers folder, or a hub id (None: a checkpoint without assets.json)
    word_vectors: Path | None
    word_vectors_sha256: str | None
    sampler: dict | None  # default SamplerSettings fields, when the folder stores them
    training: dict  # "step" (and "expert_steps", "job") when recorded

    @property
    def step(self) -> int | None:
        return self.training.get("step")


def locate(folder: str | Path, weights: str = "ema", assets: bool = True) -> ModelFiles:
    """The parts of a model folder (model_index.json) or of a training checkpoint, checked to exist.

    weights: "ema" (what sampling uses) or "model" (a checkpoint's live weights; a model folder keeps EMA only).
    assets: a checkpoint must have its assets.json (the autoencoder and word vectors sampling needs)."""
    folder = Path(folder)
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    files = _model_folder(folder, weights) if (folder / MODEL_INDEX).is_file() else _checkpoint(folder, weights, assets)
    for path in filter(None, (files.weights, files.word_vectors)):
        if not path.is_file():
            raise FileNotFoundError(f"model {folder} has no {path.relative_to(folder)}")
    return files


def _model_folder(folder: Path, weights: str) -> ModelFiles:
    if weights != "ema":
        raise ValueError(f"model folder {folder} holds the EMA weights only; the live weights are in the "
                         "training checkpoints")
    index = _read_json(folder / MODEL_INDEX)
    denoiser, scheduler = _read_json(folder / "denoiser/config.json"), _read_json(folder / "scheduler" / SCHEDULER_CONFIG)
    vectors = _read_json(folder / "word_vectors/config.json")
    training = _read_json(folder / TRAINING) if (folder / TRAINING).is_file() else {}
    return ModelFiles(folder, {**denoiser, "diffusion": scheduler["diffusion"]}, folder / "denoiser" / WEIGHTS,
                      index.get("_autoencoder_hub_id") or folder / "autoencoder", folder / "word_vectors" / vectors["file"],
                      vectors.get("sha256"), scheduler.get("sampler"), training)


def _checkpoint(folder: Path, weights: str, needs_assets: bool) -> ModelFiles:
    for name in ("config.json", ASSETS)[:1 + needs_assets]:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {name}"
                                    + (" (autoencoder and word vectors)" if name == ASSETS else "")
                                    + f"; a model folder has a {MODEL_INDEX}")
    assets = _read_json(folder / ASSETS) if (folder / ASSETS).is_file() else {}
    autoencoder, vectors = assets.get("autoencoder"), assets.get("word_vectors")
    if autoencoder and assets.get("autoencoder_is_local", True):
        autoencoder = (folder / autoencoder).resolve()
    training = load_state(folder) if (folder / "state.json").is_file() else {}
    return ModelFiles(folder, _read_json(folder / "config.json"), folder / f"{weights}.safetensors", autoencoder,
                      folder / vectors if vectors else None, assets.get("word_vectors_sha256"), None,
                      {key: training[key] for key in ("step", "expert_steps") if key in training})


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"model folder {path.parent} has no {path.name}")
    return json.loads(path.read_text())


def assets_for(manifest_folder: str) -> dict:
    """A training checkpoint's assets.json: the shards' autoencoder and word vectors (absolute paths)."""
    manifest = load_manifest(manifest_folder)
    autoencoder = manifest.resolve(manifest_folder, manifest.autoencoder) if manifest.autoencoder_is_local \
        else manifest.autoencoder
    return {"autoencoder": autoencoder, "autoencoder_is_local": manifest.autoencoder_is_local,
            "word_vectors": manifest.resolve(manifest_folder, manifest.word_vectors),
            "word_vectors_sha256": manifest.word_vectors_sha256}


def data_codec(manifest_folder: str, text_len: int) -> TextCodec:
    """The captions' codec of a shard folder: its word vectors (checksum checked) at `text_len` slots."""
    assets = assets_for(manifest_folder)
    return TextCodec(load_vectors(assets["word_vectors"], assets["word_vectors_sha256"]), text_len)


def rounding_vocabulary(data_folder: str, model: ModelConfig, diffusion: DiffusionConfig) -> torch.Tensor | None:
    """The word vectors, as the text is encoded (TextCodec.table), that diffusion.rounding_loss_weight trains
    against: those of the shard folder the model trains on; None when the term is off."""
    return data_codec(data_folder, model.text_len).table if diffusion.rounding_loss_weight else None


def write(out: str | Path, config: dict, weights: dict[str, torch.Tensor], autoencoder: Path | str | AutoencoderKL,
          word_vectors: Path | KeyedVectors, training: dict, sampler: dict | None = None) -> Path:
    """A fresh model folder `out` (replaced if it exists).

    config: "model", "diffusion" (and "experts"); weights: the sampling (EMA) weights; autoencoder: a local
    diffusers folder (copied), a hub id (named) or a loaded AutoencoderKL (saved); word_vectors: a word2vec
    binary file (copied) or KeyedVectors (saved); training: "step" and whatever else the run records."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    for part in ("denoiser", "word_vectors", "scheduler"):
        (out / part).mkdir(parents=True)
    denoiser = {key: config[key] for key in ("model", "experts") if key in config}
    _write_json(out / "denoiser/config.json", denoiser)
    save_weights(out / "denoiser" / WEIGHTS, weights)
    _write_json(out / "scheduler" / SCHEDULER_CONFIG, {"diffusion": config["diffusion"], "sampler": sampler})
    vectors = out / "word_vectors/words.bin"
    if isinstance(word_vectors, KeyedVectors):
        word_vectors.save_word2vec_format(str(vectors), binary=True)
    else:
        shutil.copy2(word_vectors, vectors)
    _write_json(out / "word_vectors/config.json", {"file": vectors.name, "sha256": file_sha256(vectors),
                                                   "vector_size": config["model"]["word_dim"]})
    index = {"_class_name": "PSUNetPipeline",
             "denoiser": ["psunet", "ExpertEnsemble" if "experts" in config else "PSUNet"],
             "autoencoder": ["diffusers", "AutoencoderKL"], "word_vectors": ["gensim", "KeyedVectors"],
             "scheduler": ["psunet", "SamplerSettings"]}
    if isinstance(autoencoder, AutoencoderKL):
        autoencoder.save_pretrained(str(out / "autoencoder"))
    elif isinstance(autoencoder, Path):
        shutil.copytree(autoencoder, out / "autoencoder")
    else:
        index["_autoencoder_hub_id"] = autoencoder
    _write_json(out / MODEL_INDEX, index)
    _write_json(out / TRAINING, training)
    return out


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2))


def bundle(checkpoint: str | Path, out: str | Path) -> Path:
    """The model folder of a training checkpoint (or of another model folder): EMA weights, configs, training
    step and job config, word vectors and autoencoder copied in."""
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"model folder {out}: write it beside {checkpoint}, not over it")
    files = locate(checkpoint)
    training = {**files.training, **({"job": files.config["job"]} if "job" in files.config else {})}
    return write(out, files.config, load_file(str(files.weights)), files.autoencoder, files.word_vectors, training,
                 files.sampler)


def assemble_experts(checkpoints: list[str], intervals: list[tuple[int, int]], out: str | Path) -> Path:
    """One model folder from K finished expert runs: their EMA weights as experts.<i>.*, the intervals in the
    denoiser config, the assets of the first (all branches share the base's data)."""
    parts = [locate(folder) for folder in checkpoints]
    weights = {f"experts.{i}.{name}": tensor for i, files in enumerate(parts)
               for name, tensor in load_file(str(files.weights)).items()}
    first = parts[0]
    config = {**first.config, "experts": {"intervals": [list(pair) for pair in intervals]}}
    steps = [files.step for files in parts]
    return write(out, config, weights, first.autoencoder, first.word_vectors,
                 {"step": max(steps), "expert_steps": steps}, first.sampler)


def build_model(config: dict) -> tuple[PSUNet | ExpertEnsemble, ModelConfig, DiffusionConfig]:
    """An untrained model for a model config dict: a PSUNet, or an ExpertEnsemble when it names experts."""
    model_config = ModelConfig.model_validate(config["model"])
    diffusion_config = DiffusionConfig.saved(config["diffusion"])
    if "experts" in config:
        intervals = check_intervals(config["experts"]["intervals"], diffusion_config.num_train_timesteps)
        return ExpertEnsemble(model_config, intervals), model_config, diffusion_config
    return PSUNet(model_config), model_config, diffusion_config


def upgrade_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Weights saved before the time tokens had their own embeddings get zero ones: the same function as before."""
    for name, tensor in expected.items():
        if name.endswith("time_pos") and name not in state:
            state[name] = torch.zeros_like(tensor)


def load_model(folder: str | Path, weights: str = "ema", device: str | torch.device = "cpu"
               ) -> tuple[PSUNet | ExpertEnsemble, ModelConfig, DiffusionConfig, dict]:
    """A ready-to-sample model from a model folder or a training checkpoint: (model in eval mode, configs,
    config dict). Refuses weights that do not fit the config, naming the mismatched tensors."""
    return model_from(locate(folder, weights, assets=False), device)


def model_from(files: ModelFiles, device: str | torch.device = "cpu"
               ) -> tuple[PSUNet | ExpertEnsemble, ModelConfig, DiffusionConfig, dict]:
    """load_model for parts already located."""
    model, model_config, diffusion_config = build_model(files.config)
    state = load_file(str(files.weights))
    expected = model.state_dict()
    upgrade_weights(state, expected)
    bad = sorted(set(expected) ^ set(state)) + [
        f"{name} {tuple(state[name].shape)} != {tuple(tensor.shape)}"
        for name, tensor in expected.items() if name in state and state[name].shape != tensor.shape]
    if bad:
        raise ValueError(f"checkpoint {files.folder}: weights do not match its model config: {', '.join(bad[:5])}"
                         + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    model.load_state_dict(state)
    return model.to(device).eval(), model_config, diffusion_config, files.config


def resolve(reference: str | Path, **options) -> Path:
    """A local folder for a model reference: the folder itself, or what an installed model source (entry point
    group psunet.model_sources, e.g. MLflow's models:/ and runs:/ URIs) makes of a URI; `options` go to it."""
    from importlib.metadata import entry_points

    if Path(reference).is_dir():
        return Path(reference)
    if not _URI.match(str(reference)):
        raise FileNotFoundError(f"model: {str(reference)!r} is neither a folder nor a model URI "
                                "(runs:/<run id>/model, models:/<name>/<version>)")
    sources = entry_points(group=SOURCES)
    if not sources:
        raise FileNotFoundError(f"model: {reference!r} is a URI, and no installed package resolves model URIs "
                                f"(entry point group {SOURCES})")
    for source in sources:
        folder = source.load()(str(reference), **options)
        if folder is not None:
            return Path(folder)
    raise FileNotFoundError(f"model: no installed model source resolves {reference!r} "
                            f"({', '.join(source.name for source in sources)})")


def build_parser() -> argparse.ArgumentParser:
    """python -m psunet.model_folder SOURCE OUT: a training checkpoint or an older model folder as a model folder."""
    parser = argparse.ArgumentParser(prog="python -m psunet.model_folder",
                                     description=build_parser.__doc__.split(": ", 1)[1])
    parser.add_argument("source", help="a training checkpoint, or a model folder (any layout psunet has written)")
    parser.add_argument("out", help="the model folder to write (replaced if it exists)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = bundle(args.source, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"model_folder: {error}", file=sys.stderr)
        return 2
    print(f"model_folder: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
