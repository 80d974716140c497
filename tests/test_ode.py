"""Neural-ODE blocks (cU-Net): forward/backward, fewer parameters than the stack they replace, solver checks."""

from pathlib import Path

import pytest
import torch

from jobs.config import load_config
from psunet.config import preset
from psunet.model import PSUNet, parameter_counts

# the tiny preset with a shared stack to replace: 2 in-blocks, a mid block, 2 out-blocks
DISCRETE = preset("tiny").model_copy(update={"shared_depth": 5})
ODE = DISCRETE.model_copy(update={"block_type": "ode"})


def inputs(batch: int = 2):
    c = DISCRETE
    return torch.randn(batch, *c.latent_shape), torch.randn(batch, c.text_len, c.word_dim), torch.tensor([5, 900])


@pytest.mark.parametrize("solver, steps, adjoint", [("rk4", 1, False), ("euler", 3, False), ("midpoint", 2, True),
                                                   ("dopri5", 1, False)])
def test_ode_blocks_forward_and_backward(solver, steps, adjoint):
    config = ODE.model_copy(update={"ode_solver": solver, "ode_steps": steps, "ode_adjoint": adjoint})
    model = PSUNet(config)
    out = model(*inputs())
    assert out.eps_image.shape == (2, *config.latent_shape) and out.eps_text.shape == (2, 16, 16)
    assert torch.isfinite(out.eps_image).all()
    (out.eps_image.square().mean() + out.eps_text.square().mean()).backward()
    shared = model.shared
    for block in (shared.in_block, shared.mid_block, shared.out_block):
        assert block.attn.qkv.weight.grad is not None and block.attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in shared.skip_projs.parameters())


def test_the_ode_stack_has_fewer_parameters_than_the_discrete_stack_it_replaces():
    discrete, ode = parameter_counts(PSUNet(DISCRETE)), parameter_counts(PSUNet(ODE))
    block = sum(p.numel() for p in PSUNet(DISCRETE).shared.mid_block.parameters())
    assert ode["shared"] < discrete["shared"]
    assert discrete["shared"] - ode["shared"] == 2 * block  # 5 blocks -> 3 weight-tied ones
    assert {k: v for k, v in ode.items() if k not in ("shared", "total")} == \
        {k: v for k, v in discrete.items() if k not in ("shared", "total")}


def test_euler_with_one_step_is_a_weight_tied_discrete_stack():
    """One Euler step per unit of ODE time is exactly x + block.residual(x): the discrete block, weights tied."""
    config = ODE.model_copy(update={"ode_solver": "euler", "ode_steps": 1})
    model = PSUNet(config).eval()
    shared = model.shared
    tokens = torch.randn(2, 34, config.width)
    with torch.no_grad():
        mid_in, skips = shared.run_in(tokens, model.run_block)
        expected = tokens
        for skip in skips:
            expected = expected + shared.in_block.residual(expected)
            assert torch.allclose(skip, expected, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("model.ode_solver=rk5", "torchdiffeq has no solver 'rk5'"),
    ("model.ode_steps=0", "ode_steps"),
    ("model.block_type=continuous", "block_type"),
])
def test_bad_ode_settings_are_refused_naming_the_field(override, message):
    with pytest.raises(ValueError) as error:
        load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"), ["model.block_type=ode", override])
    assert message in str(error.value)
