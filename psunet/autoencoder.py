"""The one loading path for image autoencoders: pixels <-> scaled diffusion latents.

`Autoencoder` wraps a diffusers `AutoencoderKL`, whether it comes from the Hugging Face hub
(e.g. "stabilityai/sd-vae-ft-mse") or from a local folder written by `save_pretrained` (such as
the small VAE that `dataprep.vae.train_vae` trains offline on a data set's own images). Latents
are the posterior mean times the scaling factor, so encoding is deterministic and the latents
the diffusion model sees have roughly unit variance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL


class Autoencoder:
    """Encodes images to scaled latents and decodes them back, with the VAE frozen in eval mode."""

    def __init__(self, vae: AutoencoderKL, scaling_factor: float | None = None):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor if scaling_factor is None else scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def load(
        cls,
        name_or_path: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        subfolder: str | None = None,
    ) -> Autoencoder:
        """An `AutoencoderKL` from a local folder or a hub id, on `device` in `dtype`."""
        path = Path(name_or_path).expanduser()
        local = str(name_or_path).startswith(("/", ".", "~")) or path.exists()
        if local and not path.exists():
            raise FileNotFoundError(f"autoencoder folder not found: {name_or_path}")
        source = str(path) if local else name_or_path
        try:
            vae = AutoencoderKL.from_pretrained(
                source, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False
            )
        except (OSError, ValueError) as error:
            if local:
                raise
            raise RuntimeError(
                f"could not load the autoencoder {name_or_path!r} from the Hugging Face hub "
                "(offline, or no such model?). To use a VAE on disk, pass the path of a local "
                "folder holding its config.json and weights (e.g. one written by save_pretrained "
                f"or by dataprep.vae.train_vae). Cause: {error}"
            ) from error
        return cls(vae.to(device))

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(channels, height, width) of the latents of a square image of this many pixels a side."""
        if resolution <= 0 or resolution % self.downsample:
            raise ValueError(
                f"resolution {resolution} must be a positive multiple of the autoencoder's "
                f"downsampling factor {self.downsample}"
            )
        side = resolution // self.downsample
        return self.latent_channels, side, side

    @torch.no_grad()
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Float32 latents (B, C, H/d, W/d) on the model's device.

        `images` are uint8 (B, H, W, 3) in [0, 255] (numpy or torch) or a float tensor
        (B, 3, H, W) in [-1, 1].
        """
        pixels = self._to_model_pixels(images)
        mean = self.vae.encode(pixels).latent_dist.mean
        return (mean * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Float32 images (B, 3, H, W) in [0, 1] on the model's device, from scaled latents."""
        latents = torch.as_tensor(latents)
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, h, w), got shape {tuple(latents.shape)}"
            )
        latents = latents.to(self.device, self.dtype) / self.scaling_factor
        images = self.vae.decode(latents).sample.float()
        return ((images + 1) / 2).clamp(0, 1)

    @staticmethod
    def to_uint8(images01: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8 numpy images."""
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images01.shape)}")
        scaled = (images01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return scaled.permute(0, 2, 3, 1).cpu().numpy()

    def _to_model_pixels(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] in the model's dtype and device, after checking the layout."""
        images = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        if images.ndim != 4:
            raise ValueError(f"images must be a batch with 4 dimensions, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            if images.shape[-1] != 3:
                raise ValueError(f"uint8 images must be (B, H, W, 3), got shape {tuple(images.shape)}")
            images = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        elif images.dtype.is_floating_point:
            if images.shape[1] != 3:
                raise ValueError(f"float images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        else:
            raise ValueError(f"images must be uint8 (B, H, W, 3) or float (B, 3, H, W), got {images.dtype}")
        height, width = images.shape[2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(
                f"image size {height}x{width} must be divisible by the autoencoder's "
                f"downsampling factor {self.downsample}"
            )
        return images.to(self.device, self.dtype)
