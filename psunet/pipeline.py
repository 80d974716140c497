"""A trained model with its autoencoder and word vectors: the tasks users call, all through one sampler.

    pipe = Pipeline.from_checkpoint("runs/demo/checkpoint_...")
    images, _ = pipe.text_to_image(["a small red circle on the left"])
    captions = pipe.image_to_text(images_uint8)

Every task is `joint_infill` with a different known part and mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from psunet.autoencoder import Autoencoder
from psunet.checkpoint import load_model
from psunet.config import DiffusionConfig, ModelConfig
from psunet.model import PSUNet
from psunet.sampling import SampleOutput, joint_infill
from psunet.text import TextCodec, load_vectors

ASSETS = "assets.json"


@dataclass
class SamplerSettings:
    guidance_scale: float = 3.0
    steps: int = 25
    scheduler: str = "dpmsolver++"
    seed: int = 0


@dataclass
class Pipeline:
    model: PSUNet
    model_config: ModelConfig
    diffusion_config: DiffusionConfig
    codec: TextCodec
    autoencoder: Autoencoder
    settings: SamplerSettings = field(default_factory=SamplerSettings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_checkpoint(cls, folder: str | Path, weights: str = "ema", device: str = "cpu") -> "Pipeline":
        """Load a checkpoint folder whose `assets.json` names the autoencoder and the word vectors.

        Relative asset paths are resolved against the folder, so a bundled model folder is self-contained.
        """
        folder = Path(folder)
        model, model_config, diffusion_config, _ = load_model(folder, weights=weights, device=device)
        assets_path = folder / ASSETS
        if not assets_path.is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {ASSETS} (autoencoder and word vectors)")
        assets = json.loads(assets_path.read_text())
        autoencoder_ref = assets["autoencoder"]
        if assets.get("autoencoder_is_local", True):
            autoencoder_ref = str((folder / autoencoder_ref).resolve())
        vectors = load_vectors(folder / assets["word_vectors"], assets.get("word_vectors_sha256"))
        codec = TextCodec(vectors, model_config.text_len)
        if codec.dim != model_config.word_dim:
            raise ValueError(f"word vectors are {codec.dim}-d but the model's word_dim is {model_config.word_dim}")
        return cls(model, model_config, diffusion_config, codec, Autoencoder.load(autoencoder_ref, device=device))

    def sample(self, batch_size: int, settings: SamplerSettings | None = None, **known) -> SampleOutput:
        s = settings or self.settings
        return joint_infill(self.model, self.model_config, self.diffusion_config, batch_size,
                            guidance_scale=s.guidance_scale, steps=s.steps, scheduler=s.scheduler, seed=s.seed,
                            device=self.device, **known)

    def text_to_image(self, prompts: list[str], settings: SamplerSettings | None = None
                      ) -> tuple[np.ndarray, list[list[str]]]:
        """Images (B, H, W, 3) uint8 for the prompts, and the unknown words of each prompt."""
        encoded = self.codec.encode(prompts)
        out = self.sample(len(prompts), settings, text_known=encoded.vectors.to(self.device))
        return self.decode_images(out.image_latents), encoded.unknown

    def image_to_text(self, images: np.ndarray, settings: SamplerSettings | None = None) -> list[str]:
        """Captions for (B, H, W, 3) uint8 images."""
        latents = self.autoencoder.encode(images).to(self.device)
        out = self.sample(len(images), settings, image_known=latents)
        return self.codec.decode(out.text_vectors)

    def generate(self, count: int, settings: SamplerSettings | None = None) -> tuple[np.ndarray, list[str]]:
        """Unconditional joint (image, caption) pairs."""
        out = self.sample(count, settings)
        return self.decode_images(out.image_latents), self.codec.decode(out.text_vectors)

    def decode_images(self, latents: torch.Tensor) -> np.ndarray:
        return Autoencoder.to_uint8(self.autoencoder.decode(latents.to(self.autoencoder.device)))
