"""PSUNetPipeline with diffusers' conventions: the model folder it saves and loads (from a folder, a training
checkpoint and a models:/ URI), and calls with prompt / image / mask_image / generator / output_type that give what
the task methods give."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import tracking
from psunet.model_folder import MODEL_INDEX
from psunet.pipeline import PSUNetPipeline, PSUNetPipelineOutput
from psunet.settings import SamplerSettings

PROMPTS = ["a small red circle on the left", "a big blue box at the top"]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return PSUNetPipeline.from_pretrained(tiny_model)


def test_the_model_folder_follows_diffusers_layout(tiny_model):
    index = json.loads((tiny_model / MODEL_INDEX).read_text())
    assert index["_class_name"] == "PSUNetPipeline"
    assert index["denoiser"] == ["psunet", "PSUNet"] and index["autoencoder"] == ["diffusers", "AutoencoderKL"]
    assert index["word_vectors"] == ["gensim", "KeyedVectors"] and index["scheduler"] == ["psunet", "SamplerSettings"]
    for path in ("denoiser/config.json", "denoiser/diffusion_pytorch_model.safetensors", "autoencoder/config.json",
                 "autoencoder/diffusion_pytorch_model.safetensors", "word_vectors/config.json", "word_vectors/words.bin",
                 "scheduler/scheduler_config.json", "training.json"):
        assert (tiny_model / path).is_file(), path
    assert json.loads((tiny_model / "training.json").read_text())["step"] == 60
    assert set(json.loads((tiny_model / "denoiser/config.json").read_text())) == {"model"}


def test_a_saved_trained_model_loads_from_folder_and_models_uri_with_the_sampler_paths_images(pipe, tiny_model,
                                                                                                 tmp_path):
    settings = SamplerSettings(steps=3, seed=4)
    expected, _ = pipe.text_to_image(PROMPTS, settings)  # the task method: one generator seeded 4

    saved = pipe.save_pretrained(tmp_path / "saved")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id = tracking.create_run(client, "exp", tmp_path, "train")
    client.log_artifacts(run_id, str(saved), "model")
    assert tracking.register_model(client, "tiny", run_id) == "models:/tiny/1"
    for loaded in (PSUNetPipeline.from_pretrained(saved),
                   PSUNetPipeline.from_pretrained("models:/tiny/1", tracking_uri=uri),
                   PSUNetPipeline.from_pretrained(tiny_model.parent / "checkpoint")):  # a training checkpoint
        out = loaded(prompt=PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(4))
        assert isinstance(out, PSUNetPipelineOutput) and len(out.images) == 2
        assert all(isinstance(image, Image.Image) and image.size == (32, 32) for image in out.images)
        np.testing.assert_array_equal(np.stack([np.asarray(image) for image in out.images]), expected)
        assert loaded.training_step == 60

    # a generator per sample is a seed per sample: each sample independent of its batch mates
    per_sample = pipe.infill(prompts=PROMPTS, settings=settings, seeds=[7, 8]).images
    out = pipe(PROMPTS, num_inference_steps=3, generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
               output_type="np")
    assert out.images.dtype == np.float32 and out.images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(np.rint(out.images * 255).astype(np.uint8), per_sample)


def test_sampler_defaults_travel_with_the_folder(pipe, tmp_path):
    pipe.settings = SamplerSettings(steps=2, scheduler="ddim", guidance_scale=2.0, seed=3)
    try:
        loaded = PSUNetPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "saved"))
    finally:
        pipe.settings = SamplerSettings()
    assert loaded.settings == SamplerSettings(steps=2, scheduler="ddim", guidance_scale=2.0, seed=3)
    assert loaded(batch_size=2).images[0].size == (32, 32)  # unconditional pairs with the stored defaults


def test_pil_images_and_masks_are_what_arrays_say(pipe):
    images, _ = pipe.text_to_image(PROMPTS[:1], SamplerSettings(steps=2))
    settings = SamplerSettings(steps=2, seed=5)
    captions = pipe.image_to_text(images, settings)
    out = pipe(image=Image.fromarray(images[0]), num_inference_steps=2, generator=torch.Generator().manual_seed(5))
    assert out.captions == captions

    mask = np.zeros((1, 32, 32), bool)
    mask[:, :, 16:] = True  # white in the PIL mask: generate the right half
    expected = pipe.infill(prompts=PROMPTS[:1], images=images, image_masks=mask, settings=settings).images
    out = pipe(prompt=PROMPTS[0], image=[Image.fromarray(images[0])],
               mask_image=Image.fromarray(mask[0].astype(np.uint8) * 255), num_inference_steps=2,
               generator=torch.Generator().manual_seed(5), output_type="np")
    # the same sample; float noise of another thread count may move a pixel across a rounding boundary
    difference = np.abs(np.rint(out.images * 255).astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert (expected[0, :, :16] == images[0, :, :16]).all()  # the known half comes back as given


@pytest.mark.parametrize("call,message", [
    (dict(prompt="a red circle", output_type="latent"), "output_type must be one of pil, np"),
    (dict(prompt="a red circle", num_inference_steps=0), "steps"),
    (dict(prompt="a red circle", generator=[torch.Generator(), torch.Generator()]), "generators: give one value"),
    (dict(image=Image.new("RGB", (64, 64))), r"images must be uint8 \(B, 32, 32, 3\)"),
])
def test_bad_calls_are_named(pipe, call, message):
    with pytest.raises(ValueError, match=message):
        pipe(**call)


def test_a_model_reference_that_is_neither_folder_nor_uri_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a model URI"):
        PSUNetPipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="cannot download 'models:/tiny/9'"):
        PSUNetPipeline.from_pretrained("models:/tiny/9", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_a_checkpoint_converts_to_a_model_folder(tiny_model, tmp_path, capsys):
    from psunet.model_folder import main

    assert main([str(tiny_model.parent / "checkpoint"), str(tmp_path / "converted")]) == 0
    assert (tmp_path / "converted" / MODEL_INDEX).is_file() and "wrote" in capsys.readouterr().out
    settings = SamplerSettings(steps=2)
    converted = PSUNetPipeline.from_pretrained(tmp_path / "converted").text_to_image(PROMPTS, settings)[0]
    np.testing.assert_array_equal(converted, PSUNetPipeline.from_pretrained(tiny_model).text_to_image(PROMPTS, settings)[0])
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main([str(tmp_path / "converted"), str(tmp_path / "converted")]) == 2  # not over its source
    assert "not over it" in capsys.readouterr().err and (tmp_path / "converted" / MODEL_INDEX).is_file()


def test_a_model_folder_in_the_earlier_flat_layout_still_loads(tiny_model, tmp_path):
    """Folders written before model_index.json: config.json, ema.safetensors, state.json, and an assets.json naming
    the word vectors and the autoencoder copied in beside them."""
    checkpoint, old = tiny_model.parent / "checkpoint", tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "ema.safetensors", "state.json"):
        shutil.copy2(checkpoint / name, old / name)
    shutil.copy2(tiny_model / "word_vectors/words.bin", old / "words.bin")
    shutil.copytree(tiny_model / "autoencoder", old / "vae")
    vectors = json.loads((tiny_model / "word_vectors/config.json").read_text())
    (old / "assets.json").write_text(json.dumps({"word_vectors": "words.bin", "word_vectors_sha256": vectors["sha256"],
                                                 "autoencoder": "vae", "autoencoder_is_local": True}))
    settings = SamplerSettings(steps=2)
    loaded = PSUNetPipeline.from_pretrained(old)
    assert loaded.training_step == 60
    np.testing.assert_array_equal(loaded.text_to_image(PROMPTS, settings)[0],
                                  PSUNetPipeline.from_pretrained(tiny_model).text_to_image(PROMPTS, settings)[0])
