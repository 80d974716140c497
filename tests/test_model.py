"""PS-U-Net shapes, presets, parameter matching, gradient flow and config validation."""

import pytest
import torch
from pydantic import ValidationError

from psunet.config import PRESET_NAMES, ModelConfig, baseline_of, preset
from psunet.model import PSUNet, forward_flops, parameter_counts


def small_config(**overrides) -> ModelConfig:
    return preset("tiny").model_copy(update=overrides)


def random_inputs(config: ModelConfig, batch: int = 3):
    return (torch.randn(batch, *config.latent_shape), torch.randn(batch, config.text_len, config.word_dim),
            torch.randint(0, 1000, (batch,)))


@pytest.mark.parametrize("n_text,n_image", [(0, 0), (1, 0), (0, 2), (2, 4), (3, 1)])
def test_output_shapes_and_dtypes(n_text, n_image):
    config = small_config(n_text=n_text, n_image=n_image, shared_depth=3)
    out = PSUNet(config)(*random_inputs(config))
    assert out.eps_image.shape == (3, *config.latent_shape) and out.eps_image.dtype == torch.float32
    assert out.eps_text.shape == (3, config.text_len, config.word_dim) and out.eps_text.dtype == torch.float32
    assert torch.isfinite(out.eps_image).all() and torch.isfinite(out.eps_text).all()


def test_block_counts_follow_config():
    model = PSUNet(small_config(n_text=2, n_image=3, shared_depth=5))
    assert len(model.text_specific.in_blocks) == len(model.text_specific.out_blocks) == 2
    assert len(model.image_specific.in_blocks) == len(model.image_specific.out_blocks) == 3
    assert len(model.shared.in_blocks) == len(model.shared.out_blocks) == 2 and model.shared.mid_block is not None


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_baseline_preset_has_no_specific_blocks_and_matches_parameters(name):
    base_config = preset(f"{name}-baseline")
    assert base_config.n_text == base_config.n_image == 0
    counts = parameter_counts(PSUNet(base_config))
    ps_total = parameter_counts(PSUNet(preset(name)))["total"]
    assert counts["image_specific"] == counts["text_specific"] == 0
    assert abs(counts["total"] - ps_total) / ps_total < 0.02


def test_coco256_preset_is_paper_scale():
    config = preset("coco256")
    assert config.latent_shape == (4, 32, 32) and (config.n_text, config.n_image) == (2, 4)
    assert preset("coco256-baseline") == baseline_of(config)
    ps, base = parameter_counts(PSUNet(config))["total"], parameter_counts(PSUNet(baseline_of(config)))["total"]
    assert abs(ps - base) / ps < 0.02


def test_parameter_counts_add_up_and_flops_favour_ps_unet():
    model = PSUNet(preset("demo"))
    counts = parameter_counts(model)
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    assert counts["image_specific"] > 0 and counts["text_specific"] > 0
    # modality blocks attend over fewer tokens than shared blocks, so PS-U-Net is cheaper per sample
    flops, baseline_flops = forward_flops(model), forward_flops(PSUNet(preset("demo-baseline")))
    assert 0 < flops < baseline_flops
    # a lower bound from the linear layers alone: 2 FLOPs per multiply-add per token
    tokens = 2 + model.config.text_len + model.config.image_tokens
    assert flops > 2 * counts["shared"] * tokens * 0.9


def test_gradients_reach_every_parameter():
    config = small_config(n_text=1, n_image=2, shared_depth=3)
    model = PSUNet(config)
    out = model(*random_inputs(config))
    (out.eps_image.square().mean() + out.eps_text.square().mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_the_adaln_path_starts_as_the_plain_model_and_then_learns_at_about_the_same_flops():
    config = small_config(n_text=1, n_image=2, shared_depth=3)
    plain, direct = PSUNet(config), PSUNet(config.model_copy(update={"adaln": True}))
    missing = direct.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith(("pool_", "modulation")) or key.endswith("modulation_offset")
                           for key in missing)
    inputs = random_inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(direct(*inputs).eps_image, plain(*inputs).eps_image)  # zero-initialised
    optimizer = torch.optim.SGD(direct.parameters(), lr=0.1)
    for _ in range(2):  # the first step moves the modulation off zero, the second reaches the pools through it
        optimizer.zero_grad()
        out = direct(*inputs)
        (out.eps_image.square().mean() + out.eps_text.square().mean()).backward()
        optimizer.step()
    untouched = [name for name, p in direct.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert untouched == []
    other_text = (inputs[0], torch.randn_like(inputs[1]), inputs[2])
    with torch.no_grad():  # the image now also reads the pooled caption, not only through attention
        assert not torch.allclose(direct(*inputs).eps_image, direct(*other_text).eps_image)
    demo = preset("demo")
    ratio = forward_flops(PSUNet(demo.model_copy(update={"adaln": True}))) / forward_flops(PSUNet(demo))
    assert 1 < ratio < 1.02  # one modulation per sample and modality, not per token
    with pytest.raises(ValidationError, match="adaln"):
        ModelConfig(**{**config.model_dump(), "adaln": True, "block_type": "ode"})


def test_gradient_checkpointing_gives_same_gradients():
    config = small_config(n_text=1, n_image=1, shared_depth=3)
    inputs = random_inputs(config)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = PSUNet(config.model_copy(update={"grad_checkpoint": checkpointing}))
        out = model(*inputs)
        out.eps_image.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", ["tiny-baseline", "tiny"])
def test_swapping_the_image_and_text_times_changes_the_output(name):
    """Each time token has its own embedding: attention ignores order, so without it the baseline (no
    modality-specific blocks) could not tell which time belongs to which modality."""
    config = preset(name)
    model = PSUNet(config).eval()
    image, text, _ = random_inputs(config)
    times = torch.stack([torch.full((image.shape[0],), 100), torch.full((image.shape[0],), 900)])
    with torch.no_grad():
        straight, swapped = model(image, text, times), model(image, text, times.flip(0))
    assert (straight.eps_image - swapped.eps_image).abs().max() > 1e-3
    assert (straight.eps_text - swapped.eps_text).abs().max() > 1e-3


def test_independent_timesteps_accepted():
    config = small_config()
    image, text, t = random_inputs(config)
    model = PSUNet(config)
    out_shared = model(image, text, t)
    out_split = model(image, text, torch.stack([t, torch.zeros_like(t)]))
    assert not torch.allclose(out_shared.eps_text, out_split.eps_text)


@pytest.mark.parametrize("field,value", [
    ("n_text", -1), ("n_image", -2), ("shared_depth", 2), ("patch_size", 3), ("heads", 5), ("width", 4),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises((ValidationError, ValueError), match=field):
        small_config().model_validate({**small_config().model_dump(), field: value})


def test_unknown_config_field_is_refused():
    with pytest.raises(ValidationError, match="depth_typo"):
        ModelConfig(depth_typo=3)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="tiny"):
        preset("huge")
    assert {"tiny", "demo", "coco256", "tiny-baseline", "demo-baseline", "coco256-baseline"} <= set(PRESET_NAMES)


@pytest.mark.parametrize("bad", ["latent", "text", "batch"])
def test_wrong_input_shapes_name_the_input(bad):
    config = small_config()
    image, text, t = random_inputs(config)
    if bad == "latent":
        image = torch.randn(3, 4, config.latent_size * 2, config.latent_size * 2)
    elif bad == "text":
        text = torch.randn(3, config.text_len + 1, config.word_dim)
    else:
        t = t[:2]
    with pytest.raises(ValueError, match={"latent": "image_latents", "text": "text_vectors", "batch": "batch"}[bad]):
        PSUNet(config)(image, text, t)
