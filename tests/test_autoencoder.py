"""A small VAE trained offline on synthetic shapes, loaded back through `Autoencoder.load`."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dataprep.vae import small_vae, train_vae
from psunet.autoencoder import Autoencoder
from conftest import VAE_STEPS as STEPS

PALETTE = np.array([(230, 30, 30), (30, 200, 30), (40, 40, 230), (230, 230, 30), (30, 220, 220)], np.uint8)
# Measured ~0.013 after conftest's 200 steps, against ~0.038 for predicting the mean image.
MAX_ROUND_TRIP_MSE = 0.02


def shapes(n: int, seed: int, size: int = 32) -> np.ndarray:
    """(n, size, size, 3) uint8: black with one or two filled coloured circles or squares."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    images = np.zeros((n, size, size, 3), np.uint8)
    for image in images:
        for _ in range(rng.integers(1, 3)):
            radius = rng.uniform(3, 7)
            cx, cy = rng.uniform(radius, size - radius, 2)
            if rng.random() < 0.5:
                mask = (xs - cx) ** 2 + (ys - cy) ** 2 < radius**2
            else:
                mask = (np.abs(xs - cx) < radius) & (np.abs(ys - cy) < radius)
            image[mask] = PALETTE[rng.integers(len(PALETTE))]
    return images


@pytest.fixture(scope="module")
def trained(demo_vae):
    """The session's small VAE (conftest: VAE_STEPS steps on demo images): (train_vae's result, the autoencoder
    loaded from its folder, its log lines)."""
    result, log, folder = demo_vae
    return result, Autoencoder.load(str(folder)), log


def test_trained_vae_round_trips_through_the_loaded_autoencoder(trained):
    result, autoencoder, _ = trained
    assert autoencoder.vae.config.scaling_factor == pytest.approx(result["scaling_factor"])
    assert autoencoder.scaling_factor == pytest.approx(result["scaling_factor"])
    assert autoencoder.latent_shape(32) == (4, 8, 8)

    images = shapes(64, seed=1)
    latents = autoencoder.encode(images)
    assert latents.shape == (64, 4, 8, 8) and latents.dtype == torch.float32
    assert 0.5 < latents.std().item() < 2.0

    decoded = autoencoder.decode(latents)
    assert decoded.shape == (64, 3, 32, 32) and decoded.dtype == torch.float32
    assert decoded.min() >= 0 and decoded.max() <= 1

    target = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mse = torch.mean((decoded - target) ** 2).item()
    mean_image_mse = torch.mean((target.mean(0, keepdim=True) - target) ** 2).item()
    assert mse < MAX_ROUND_TRIP_MSE
    assert mse < mean_image_mse / 2
    assert result["reconstruction_mse"] < MAX_ROUND_TRIP_MSE
    assert result["steps"] == STEPS

    round_tripped = Autoencoder.to_uint8(decoded)
    assert round_tripped.shape == images.shape and round_tripped.dtype == np.uint8


def test_training_logs_progress_every_100_steps(trained):
    log = trained[2]
    assert len(log) == STEPS // 100
    assert re.fullmatch(rf"vae step 100/{STEPS} loss \d+\.\d{{4}} \(\d+ img/s\)", log[0])


def test_saved_folder_holds_safetensors_and_no_pickles(trained):
    folder = Path(trained[0]["path"])
    names = {path.name for path in folder.iterdir()}
    assert "config.json" in names
    assert any(name.endswith(".safetensors") for name in names)
    assert not any(name.endswith((".bin", ".pkl", ".pt", ".ckpt")) for name in names)


def test_encode_accepts_uint8_hwc_and_float_chw(trained):
    autoencoder = trained[1]
    images = shapes(4, seed=2)
    signed = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    from_numpy = autoencoder.encode(images)
    torch.testing.assert_close(autoencoder.encode(torch.from_numpy(images)), from_numpy)
    torch.testing.assert_close(autoencoder.encode(signed), from_numpy, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_rejected(trained, tmp_path):
    autoencoder = trained[1]
    with pytest.raises(ValueError, match="H, W, 3"):
        autoencoder.encode(np.zeros((2, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="3, H, W"):
        autoencoder.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="4 dimensions"):
        autoencoder.encode(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="divisible"):
        autoencoder.encode(np.zeros((2, 30, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="multiple"):
        autoencoder.latent_shape(30)
    with pytest.raises(ValueError, match="latents"):
        autoencoder.decode(torch.zeros(2, 3, 8, 8))

    missing = tmp_path / "no-such-vae"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Autoencoder.load(str(missing))


def test_train_vae_is_deterministic_under_its_seed(tmp_path):
    images = shapes(40, seed=3, size=16)
    runs = [train_vae(images, str(tmp_path / name), steps=3, batch_size=8, log=lambda line: None) for name in "ab"]
    assert runs[0]["scaling_factor"] == runs[1]["scaling_factor"]
    assert runs[0]["reconstruction_mse"] == runs[1]["reconstruction_mse"]


def test_small_vae_downsamples_by_the_requested_factor():
    for downsample in (2, 4, 8):
        autoencoder = Autoencoder(small_vae(latent_channels=3, downsample=downsample, base_channels=16))
        assert autoencoder.downsample == downsample
        assert autoencoder.encode(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 3, 32 // downsample, 32 // downsample)
    with pytest.raises(ValueError, match="power of two"):
        small_vae(downsample=3)
