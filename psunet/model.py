"""PS-U-Net: the Partially Shared U-Net backbone for joint text + image diffusion.

Everything is a token (U-ViT style). The flow, top to bottom:

    image latents --patchify--> image tokens ┐                            ┌ image out-blocks -> image head -> eps_image
                                             ├ [t_img|t_txt|text|image] ┤
    word vectors --linear-----> text tokens  ┘     shared U-ViT           └ text out-blocks  -> text head  -> eps_text

* modality-specific in-blocks (n_image / n_text) each see only [time, own tokens];
* the shared section runs on the concatenation: in-blocks, a mid block, out-blocks, with U-ViT
  long skips (concatenate + linear) from each shared in-block to its mirror out-block;
* modality-specific out-blocks mirror the in-blocks, each taking a long skip from its matching
  dedicated in-block;
* with `adaln`, a direct path beside the tokens: each modality's tokens (its time token included) are
  modulated in every block's layer norms by its own time embedding plus the pooled other modality:

    c_image = time(t_img) + pool(text tokens)  ┐  one zero-initialised Linear -> (shift, scale, gate) x 2,
    c_text  = time(t_txt) + pool(image tokens) ┘  plus a learned offset per block (PixArt's adaLN-single)

* with `self_condition`, each modality's input layer has a zero-initialised twin that takes the model's last
  estimate of that modality's clean data (`estimate=`; zero when there is none), added to its tokens.

n_text = n_image = 0 gives the U-ViT-multi (UniDiffuser-style) baseline from the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from psunet.config import ModelConfig, ode_solver_grids


# the shared sequence: [image-branch time, text-branch time, text tokens (L), image tokens (N)]
TEXT_OFFSET = 2


@dataclass
class PaintBias:
    """Paint-with-words (eDiff-I) over the shared sequence: which (token, token) logits get a bias, and how much.

    mask (B, 1, T, T) is 1 between a painted image-patch token and its word's token (both directions);
    strength (B,) is w * log(1 + sigma) for each sample at this step (0: no bias for that sample).
    """

    mask: torch.Tensor
    strength: torch.Tensor


def paint_logit_bias(q: torch.Tensor, k: torch.Tensor, paint: PaintBias) -> torch.Tensor:
    """The additive bias on scaled logits: w log(1+sigma) max(QK^T) M / sqrt(d), max per sample and head."""
    scale = q.shape[-1] ** -0.5
    logits_max = (q @ k.transpose(-2, -1)).amax(dim=(-2, -1), keepdim=True) * scale
    return (paint.strength.view(-1, 1, 1, 1) * logits_max * paint.mask).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor, paint: PaintBias | None = None) -> torch.Tensor:
        batch, length, width = tokens.shape
        qkv = self.qkv(tokens).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        bias = None if paint is None else paint_logit_bias(q, k, paint)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block; with skip=True it first merges a U-ViT long skip (concat + linear); with
    adaln=True its layer norms take a per-token modulation (shift, scale, gate for attention, then for the MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, skip: bool = False, adaln: bool = False):
        super().__init__()
        self.skip_proj = nn.Linear(2 * width, width) if skip else None
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation_offset = nn.Parameter(torch.zeros(6 * width)) if adaln else None

    def forward(self, tokens: torch.Tensor, skip: torch.Tensor | None = None, paint: PaintBias | None = None,
                modulation: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_proj is not None:
            tokens = self.skip_proj(torch.cat([tokens, skip], dim=-1))
        return tokens + self.residual(tokens, paint, modulation)

    def residual(self, tokens: torch.Tensor, paint: PaintBias | None = None,
                 modulation: torch.Tensor | None = None) -> torch.Tensor:
        """What the block adds to its input (attention, then MLP): the vector field of an ODE block.
        modulation: (B, T or 1, 6 W) from the model's adaLN path (zero: the plain block)."""
        if modulation is None:
            attended = self.attn(self.norm1(tokens), paint)
            return attended + self.mlp(self.norm2(tokens + attended))
        shift1, scale1, gate1, shift2, scale2, gate2 = (modulation + self.modulation_offset).chunk(6, dim=-1)
        attended = (1 + gate1) * self.attn(self.norm1(tokens) * (1 + scale1) + shift1, paint)
        return attended + (1 + gate2) * self.mlp(self.norm2(tokens + attended) * (1 + scale2) + shift2)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) diffusion times, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class UShape(nn.Module):
    """A stack of blocks in U shape: in-blocks, optional mid block, out-blocks fed by mirrored long skips."""

    def __init__(self, n_in: int, with_mid: bool, width: int, heads: int, mlp_ratio: float, adaln: bool = False):
        super().__init__()
        self.in_blocks = nn.ModuleList(Block(width, heads, mlp_ratio, adaln=adaln) for _ in range(n_in))
        self.mid_block = Block(width, heads, mlp_ratio, adaln=adaln) if with_mid else None
        self.out_blocks = nn.ModuleList(Block(width, heads, mlp_ratio, skip=True, adaln=adaln) for _ in range(n_in))

    def run_in(self, tokens, run, paint=None, modulation=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for block in self.in_blocks:
            tokens = run(block, tokens, None, paint, modulation)
            skips.append(tokens)
        if self.mid_block is not None:
            tokens = run(self.mid_block, tokens, None, paint, modulation)
        return tokens, skips

    def run_out(self, tokens, skips, run, paint=None, modulation=None) -> torch.Tensor:
        for block in self.out_blocks:
            tokens = run(block, tokens, skips.pop(), paint, modulation)
        return tokens


class BlockField(nn.Module):
    """dx/ds = block.residual(x): one weight-tied block as the vector field of an ODE (autonomous in s)."""

    def __init__(self, block: Block, paint: PaintBias | None):
        super().__init__()
        self.block, self.paint = block, paint

    def forward(self, s: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.block.residual(tokens, self.paint)


class ODEUShape(nn.Module):
    """The U shape with neural-ODE halves (cU-Net): the n_in in-blocks become one weight-tied block integrated
    over s in [0, n_in], the long skips are its states at s = 1..n_in; the n_in out-blocks become one weight-tied
    block integrated over one unit after each skip merge (a skip projection per merge). The mid block stays.
    Parameters: 3 blocks + n_in projections instead of 2 n_in + 1 blocks + n_in projections.
    """

    def __init__(self, n_in: int, width: int, heads: int, mlp_ratio: float, solver: str, steps: int,
                 adjoint: bool):
        super().__init__()
        self.n_in = n_in
        self.in_block = Block(width, heads, mlp_ratio) if n_in else None
        self.mid_block = Block(width, heads, mlp_ratio)
        self.out_block = Block(width, heads, mlp_ratio) if n_in else None
        self.skip_projs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(n_in))
        fixed = ode_solver_grids()[solver]
        self.solver_options = {"method": solver, **({"options": {"step_size": 1.0 / steps}} if fixed
                                                      else {"rtol": 1e-3, "atol": 1e-3})}
        self.adjoint = adjoint

    def _integrate(self, block: Block, tokens: torch.Tensor, until: int, paint) -> torch.Tensor:
        """States at s = 0, 1, ..., until: (until + 1, B, T, W)."""
        import torchdiffeq

        grid = torch.arange(until + 1, device=tokens.device, dtype=tokens.dtype)
        field = BlockField(block, paint)
        if self.adjoint:
            return torchdiffeq.odeint_adjoint(field, tokens, grid, adjoint_params=tuple(block.parameters()),
                                              **self.solver_options)
        return torchdiffeq.odeint(field, tokens, grid, **self.solver_options)

    def run_in(self, tokens, run, paint=None, modulation=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        if self.n_in:
            states = self._integrate(self.in_block, tokens, self.n_in, paint)
            skips, tokens = list(states[1:]), states[-1]
        return run(self.mid_block, tokens, None, paint, None), skips

    def run_out(self, tokens, skips, run, paint=None, modulation=None) -> torch.Tensor:
        for proj in self.skip_projs:
            tokens = proj(torch.cat([tokens, skips.pop()], dim=-1))
            tokens = self._integrate(self.out_block, tokens, 1, paint)[-1]
        return tokens


@dataclass
class ModelOutput:
    """Each head's prediction in its target's terms (DiffusionConfig.target: the noise, v or the clean sample);
    the names are from when every head predicted the noise."""

    eps_image: torch.Tensor  # (B, C, H, W)
    eps_text: torch.Tensor  # (B, L, E)


class PSUNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, w = config, config.width
        patch_dim = c.latent_channels * c.patch_size**2

        self.image_in = nn.Linear(patch_dim, w)
        self.text_in = nn.Linear(c.word_dim, w)
        if c.self_condition:
            self.image_estimate_in = nn.Linear(patch_dim, w, bias=False)  # no bias: no estimate adds nothing
            self.text_estimate_in = nn.Linear(c.word_dim, w, bias=False)
        self.time_mlp = nn.Sequential(nn.Linear(w, 4 * w), nn.SiLU(), nn.Linear(4 * w, w))
        # one embedding per time token (image branch, text branch): without it the two times are
        # interchangeable in the shared attention, which ignores order
        self.time_pos = nn.Parameter(torch.zeros(1, 2, w))
        self.image_pos = nn.Parameter(torch.zeros(1, c.image_tokens, w))
        self.text_pos = nn.Parameter(torch.zeros(1, c.text_len, w))

        self.image_specific = UShape(c.n_image, False, w, c.heads, c.mlp_ratio, c.adaln)
        self.text_specific = UShape(c.n_text, False, w, c.heads, c.mlp_ratio, c.adaln)
        if c.block_type == "ode":
            self.shared = ODEUShape(c.shared_depth // 2, w, c.heads, c.mlp_ratio, c.ode_solver, c.ode_steps,
                                    c.ode_adjoint)
        else:
            self.shared = UShape(c.shared_depth // 2, True, w, c.heads, c.mlp_ratio, c.adaln)
        if c.adaln:  # the pooled other modality, then one modulation for every block (zero: the plain model)
            self.pool_image = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
            self.pool_text = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))

        self.image_norm = nn.LayerNorm(w)
        self.image_head = nn.Linear(w, patch_dim)
        self.image_conv = (
            nn.Conv2d(c.latent_channels, c.latent_channels, 3, padding=1) if c.conv_head else nn.Identity()
        )
        self.text_norm = nn.LayerNorm(w)
        self.text_head = nn.Linear(w, c.word_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.image_pos, std=0.02)
        nn.init.trunc_normal_(self.time_pos, std=0.02)
        nn.init.trunc_normal_(self.text_pos, std=0.02)
        if self.config.adaln:
            nn.init.zeros_(self.modulation[-1].weight)
        if self.config.self_condition:
            nn.init.zeros_(self.image_estimate_in.weight)
            nn.init.zeros_(self.text_estimate_in.weight)

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = latents.shape
        p = self.config.patch_size
        x = latents.reshape(b, ch, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), ch * p * p)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        c = self.config
        b, p, side = patches.shape[0], c.patch_size, c.latent_size // c.patch_size
        x = patches.reshape(b, side, side, c.latent_channels, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c.latent_channels, c.latent_size, c.latent_size)

    def run_block(self, block: Block, tokens, skip, paint, modulation=None):
        """One block, through activation checkpointing when the config asks for it while training."""
        if self.config.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, tokens, skip, paint, modulation, use_reentrant=False)
        return block(tokens, skip, paint, modulation)

    def check_inputs(self, image_latents: torch.Tensor, text_vectors: torch.Tensor, timesteps: torch.Tensor,
                     estimate: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        c = self.config
        if tuple(image_latents.shape[1:]) != c.latent_shape or image_latents.dim() != 4:
            raise ValueError(
                f"image_latents: expected shape (B, {', '.join(map(str, c.latent_shape))}), "
                f"got {tuple(image_latents.shape)} (config latent_channels/latent_size)"
            )
        if text_vectors.dim() != 3 or tuple(text_vectors.shape[1:]) != (c.text_len, c.word_dim):
            raise ValueError(
                f"text_vectors: expected shape (B, {c.text_len}, {c.word_dim}), got {tuple(text_vectors.shape)} "
                f"(config text_len/word_dim)"
            )
        batch = image_latents.shape[0]
        if text_vectors.shape[0] != batch or timesteps.shape[-1] != batch:
            raise ValueError(
                f"batch sizes differ: image_latents {batch}, text_vectors {text_vectors.shape[0]}, "
                f"timesteps {tuple(timesteps.shape)}"
            )
        if estimate is None:
            return
        if not c.self_condition:
            raise ValueError("estimate: this model does not take one (model.self_condition is false)")
        if estimate[0].shape != image_latents.shape or estimate[1].shape != text_vectors.shape:
            raise ValueError(f"estimate: expected the inputs' shapes {tuple(image_latents.shape)} and "
                             f"{tuple(text_vectors.shape)}, got {tuple(estimate[0].shape)} and "
                             f"{tuple(estimate[1].shape)}")

    def forward(self, image_latents: torch.Tensor, text_vectors: torch.Tensor, timesteps: torch.Tensor,
                paint: PaintBias | None = None,
                estimate: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModelOutput:
        """Predict both modalities' targets (the noise, v or the clean data: DiffusionConfig.target).

        timesteps: (B,) one time per sample, or (2, B) = (image times, text times) for independent
        per-modality times. paint: paint-with-words bias over the shared sequence [image time, text time,
        text tokens, image tokens] (TEXT_OFFSET, psunet.paint.paint_mask); applied in the shared section only,
        the one place where image and text tokens attend to each other. estimate: (image, text) the last
        estimate of the clean data, shaped as the inputs, for a self-conditioned model (none: zeros).
        """
        self.check_inputs(image_latents, text_vectors, timesteps, estimate)
        w = self.config.width
        times = timesteps if timesteps.dim() == 2 else timesteps.expand(2, -1)
        time_image = self.time_mlp(timestep_embedding(times[0], w))[:, None] + self.time_pos[:, :1]
        time_text = self.time_mlp(timestep_embedding(times[1], w))[:, None] + self.time_pos[:, 1:]

        image_embedded, text_embedded = self.image_in(self.patchify(image_latents)), self.text_in(text_vectors)
        if estimate is not None:
            image_embedded = image_embedded + self.image_estimate_in(self.patchify(estimate[0].to(image_latents)))
            text_embedded = text_embedded + self.text_estimate_in(estimate[1].to(text_vectors))
        image_tokens = torch.cat([time_image, image_embedded + self.image_pos], 1)
        text_tokens = torch.cat([time_text, text_embedded + self.text_pos], 1)
        n_text, n_image = self.config.text_len, self.config.image_tokens
        mod_image = mod_text = mod_shared = None
        if self.config.adaln:
            mod_image = self.modulation(time_image + self.pool_text(text_embedded.mean(1, keepdim=True)))
            mod_text = self.modulation(time_text + self.pool_image(image_embedded.mean(1, keepdim=True)))
            mod_shared = torch.cat([mod_image, mod_text, mod_text.expand(-1, n_text, -1),
                                    mod_image.expand(-1, n_image, -1)], 1)
        image_tokens, image_skips = self.image_specific.run_in(image_tokens, self.run_block, None, mod_image)
        text_tokens, text_skips = self.text_specific.run_in(text_tokens, self.run_block, None, mod_text)

        # shared sequence: [image-branch time, text-branch time, text tokens, image tokens]
        tokens = torch.cat([image_tokens[:, :1], text_tokens[:, :1], text_tokens[:, 1:], image_tokens[:, 1:]], 1)
        tokens, shared_skips = self.shared.run_in(tokens, self.run_block, paint, mod_shared)
        tokens = self.shared.run_out(tokens, shared_skips, self.run_block, paint, mod_shared)
        text_out = tokens[:, 1:TEXT_OFFSET + n_text]
        image_out = torch.cat([tokens[:, :1], tokens[:, TEXT_OFFSET + n_text:]], 1)

        image_out = self.image_specific.run_out(image_out, image_skips, self.run_block, None, mod_image)
        text_out = self.text_specific.run_out(text_out, text_skips, self.run_block, None, mod_text)

        eps_image = self.image_conv(self.unpatchify(self.image_head(self.image_norm(image_out[:, 1:]))))
        eps_text = self.text_head(self.text_norm(text_out[:, 1:]))
        return ModelOutput(eps_image=eps_image, eps_text=eps_text)


def parameter_counts(model: PSUNet) -> dict[str, int]:
    """Parameters per part: embeddings, image_specific, text_specific, shared, heads, total."""
    parts = {
        "embeddings": [model.image_in, model.text_in, model.time_mlp,
                       *([model.pool_image, model.pool_text, model.modulation] if model.config.adaln else []),
                       *([model.image_estimate_in, model.text_estimate_in] if model.config.self_condition else [])],
        "image_specific": [model.image_specific],
        "text_specific": [model.text_specific],
        "shared": [model.shared],
        "heads": [model.image_norm, model.image_head, model.image_conv, model.text_norm, model.text_head],
    }
    counts = {name: sum(p.numel() for m in mods for p in m.parameters()) for name, mods in parts.items()}
    counts["embeddings"] += model.image_pos.numel() + model.text_pos.numel() + model.time_pos.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def forward_flops(model: PSUNet) -> int:
    """Forward FLOPs per sample (multiply-add = 2 FLOPs), counted by torch's FLOP counter on one sample."""
    from torch.utils.flop_counter import FlopCounterMode

    c = model.config
    device = next(model.parameters()).device
    latents = torch.zeros(1, *c.latent_shape, device=device)
    text = torch.zeros(1, c.text_len, c.word_dim, device=device)
    estimate = (latents, text) if c.self_condition else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(latents, text, torch.zeros(1, device=device), estimate=estimate)
    return int(counter.get_total_flops())


def train_flops(model: PSUNet) -> int:
    """Training FLOPs per sample: the forward and its backward (3 forwards), and with self-conditioning the
    gradient-free first pass that half the samples get."""
    return int((3.5 if model.config.self_condition else 3) * forward_flops(model))
