"""Typed, validated configuration for the model and the diffusion process, with named presets.

Every field that an experiment may want to change is a field here; a bad value fails when the
config is built, with a message that names the field and the value.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base for all configs: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """PS-U-Net shape. n_text = n_image = 0 is the U-ViT-multi baseline."""

    latent_channels: int = Field(4, ge=1)
    latent_size: int = Field(8, ge=1, description="height = width of the image latents")
    patch_size: int = Field(2, ge=1)
    text_len: int = Field(16, ge=1, description="L: word slots per caption, end/pad included")
    word_dim: int = Field(32, ge=1, description="E: word2vec vector size")
    width: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    n_text: int = Field(1, ge=0, description="modality-specific text blocks (in and out each)")
    n_image: int = Field(2, ge=0, description="modality-specific image blocks (in and out each)")
    shared_depth: int = Field(3, ge=1, description="shared blocks: in-blocks + mid block + out-blocks (odd)")
    conv_head: bool = Field(True, description="3x3 conv after unpatchifying the image head")
    grad_checkpoint: bool = False
    adaln: bool = Field(
        False, description="a direct conditioning path beside the tokens: each modality's tokens get layer-norm "
        "shift, scale and gate from its own time plus the pooled other modality (DiT's adaLN, SD3's pooled vector; "
        "one modulation for all blocks plus a learned offset per block, as PixArt's adaLN-single), "
        "zero-initialised so that training starts from the plain model; discrete blocks only")
    self_condition: bool = Field(
        False, description="self-conditioning (Analog Bits; CDCD and Plaid for embedded text): each modality's input "
        "also takes the model's last estimate of its clean data (zero when there is none) through a "
        "zero-initialised linear layer beside its input layer; trained with a first estimate from a gradient-free "
        "pass on half the samples, sampled with the previous step's estimate")
    block_type: Literal["discrete", "ode"] = Field(
        "discrete", description="ode: each half of the shared U (its in-blocks, its out-blocks) is one weight-tied "
        "block integrated as a neural ODE (cU-Net), one unit of ODE time per block it replaces")
    ode_solver: str = Field("rk4", description="a torchdiffeq method; fixed-step ones use ode_steps")
    ode_steps: int = Field(1, ge=1, description="fixed solver steps per replaced block")
    ode_adjoint: bool = Field(False, description="backpropagate with the adjoint method (less memory, slower)")

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.shared_depth % 2 != 1:
            raise ValueError(f"shared_depth must be odd (in-blocks + 1 mid + out-blocks), got {self.shared_depth}")
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"latent_size={self.latent_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        if self.adaln and self.block_type == "ode":
            raise ValueError("adaln: needs block_type discrete (an ODE block's field takes no conditioning)")
        if self.ode_solver not in ode_solvers():
            raise ValueError(f"ode_solver: torchdiffeq has no solver {self.ode_solver!r}; "
                             f"choose one of {', '.join(ode_solvers())}")
        return self

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)


def ode_solver_grids() -> dict[str, bool]:
    """The torchdiffeq methods a block can use, each with whether it steps on a fixed grid (then it needs a step
    size) or adapts its steps. torchdiffeq keeps both facts in private modules: this is the one place that reads
    them. scipy_solver is left out (it needs options we do not pass)."""
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.solvers import FixedGridODESolver

    return {name: issubclass(solver, FixedGridODESolver) for name, solver in SOLVERS.items() if name != "scipy_solver"}


def ode_solvers() -> tuple[str, ...]:
    return tuple(sorted(ode_solver_grids()))


class SliceWeights(StrictModel):
    """How often each timestep slice is drawn under `timesteps: slices` (normalised to sum to 1)."""

    joint: float = Field(0.2, ge=0, description="(t, t): both modalities noised to one time")
    text_to_image: float = Field(0.4, ge=0, description="(t, 0): image noised, text clean (image given text)")
    image_to_text: float = Field(0.4, ge=0, description="(0, t): image clean, text noised (text given image)")
    independent: float = Field(0.0, ge=0, description="(t1, t2): one time per modality, drawn independently")

    @model_validator(mode="after")
    def _some_weight(self) -> "SliceWeights":
        if self.total() <= 0:
            raise ValueError("slice_weights: at least one weight must be > 0")
        return self

    def total(self) -> float:
        return self.joint + self.text_to_image + self.image_to_text + self.independent


class DiffusionConfig(StrictModel):
    """Noise schedule and training objective."""

    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = Field(0.00085, gt=0, lt=1)
    beta_end: float = Field(0.012, gt=0, lt=1)
    p_drop_text: float = Field(0.1, ge=0, le=1, description="probability of replacing the text by noise")
    p_drop_image: float = Field(0.1, ge=0, le=1, description="probability of replacing the image by noise")
    text_loss_weight: float = Field(1.0, ge=0)
    rounding_loss_weight: float = Field(
        0.0, ge=0, description="weight of a cross-entropy rounding term on the text head's clean-text estimate: the "
        "true words under logits -||x0_hat - e_w||^2 / 2 over the vocabulary (Diffusion-LM's rounding), so the "
        "estimate also has to single out the right word; 0 = off. Training needs the data's word vectors")
    text_scale: float = Field(
        1.0, gt=0, description="word vectors are multiplied by this before noising: > 1 keeps words "
        "recognisable at higher noise levels (a per-modality SNR shift); the text is then not pure noise at the "
        "last training time, while sampling starts it from N(0, I)"
    )
    prediction: Literal["epsilon", "v", "flow"] = Field(
        "v", description="what both heads predict: epsilon (the noise) or v = sqrt(a) eps - sqrt(1 - a) x0 "
        "(Salimans & Ho; at high noise it is the clean data) on the DDPM process, or flow: rectified flow, "
        "x_t = (1 - s) x0 + s eps with s = t / num_train_timesteps, the heads predicting the velocity eps - x0 "
        "(SD3, SiT); model folders saved before this field existed are epsilon models")
    text_target: Literal["epsilon", "v", "sample", "flow"] | None = Field(
        None, description="what the text head predicts, when not `prediction`: epsilon, v, or sample (the clean "
        "word vectors, as Diffusion-LM does for embedded words); a flow model's text head predicts flow or sample")
    time_mean: float = Field(0.0, allow_inf_nan=False, description="flow: training times are drawn "
                             "logit-normal (SD3), s = sigmoid(N(time_mean, time_std)); a higher mean trains noisier")
    time_std: float = Field(1.0, gt=0, allow_inf_nan=False, description="flow: the spread of the logit-normal times")
    text_shift: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="flow: the text's noise level at the image's s is "
        "shift s / (1 + (shift - 1) s) (SD3's resolution shift, per modality): > 1 makes the text noisier than the "
        "image at the same time, in training and in sampling, so the text trains where it must read the image")
    min_snr_gamma: float | None = Field(
        5.0, gt=0, description="loss weight: the cap of the clean-data weight (min-SNR-gamma, Hang et al. 2023); "
        "None = no cap")
    snr_floor: float | None = Field(
        1.0, gt=0, description="loss weight: the floor of the clean-data weight at high noise (the weight is "
        "clamp(base, snr_floor, min_snr_gamma)); None = no floor")
    weight_base: Literal["snr", "snr+1", "flow"] = Field(
        "snr", description="loss weight before cap and floor, on the clean-data error: snr (what an epsilon loss "
        "gives), snr+1 (what a v loss gives) or flow ((1 + sqrt(snr))^2 = 1 / s^2, what a plain velocity loss gives)")
    zero_terminal_snr: bool = Field(
        False, description="rescale the betas so the last time is pure noise (Lin et al. 2024; diffusers' "
        "rescale_betas_zero_snr); needs targets that are not epsilon")
    timesteps: Literal["shared", "independent", "slices"] = Field(
        "slices", description="shared: one time per sample for both modalities (the paper's joint-only training); "
        "independent: one time per modality (UniDiffuser); slices: per sample one of joint (t, t), text given "
        "(t, 0), image given (0, t) or independent, drawn with slice_weights: trains the conditionals the "
        "sampler uses")
    slice_weights: SliceWeights = Field(default_factory=SliceWeights)

    @model_validator(mode="before")
    @classmethod
    def _legacy_switch(cls, data):
        """Configs written before `timesteps` existed said `independent_timesteps: true|false`."""
        if isinstance(data, dict) and "independent_timesteps" in data:
            data = dict(data)
            legacy = data.pop("independent_timesteps")
            if "timesteps" not in data:
                data["timesteps"] = "independent" if legacy else "shared"
        return data

    @model_validator(mode="after")
    def _targets_of_the_process(self) -> "DiffusionConfig":
        text = self.target("text")
        if self.flow:
            if text not in ("flow", "sample"):
                raise ValueError(f"text_target: a flow model's text head predicts flow or sample, got {text!r}")
            if self.zero_terminal_snr:
                raise ValueError("zero_terminal_snr: a flow model already ends at pure noise; leave it false")
            return self
        if text == "flow":
            raise ValueError("text_target: flow needs prediction: flow (the rectified-flow process)")
        if self.text_shift != 1.0:
            raise ValueError("text_shift: shifts the flow process only (prediction: flow); the DDPM process "
                             "shifts the text with text_scale")
        if self.zero_terminal_snr and "epsilon" in (self.prediction, text):
            raise ValueError("zero_terminal_snr: the last time has no signal, so a noise prediction cannot give "
                             "the clean data there; use prediction: v (and a text_target other than epsilon)")
        return self

    @classmethod
    def saved(cls, data: dict) -> "DiffusionConfig":
        """The config of a saved model: one saved before `prediction` existed predicts epsilon, one saved before
        `snr_floor` existed had no floor."""
        return cls.model_validate({"prediction": "epsilon", "snr_floor": None, **data})

    def target(self, modality: Literal["image", "text"]) -> Literal["epsilon", "v", "sample", "flow"]:
        """What the head of `modality` predicts."""
        return self.text_target or self.prediction if modality == "text" else self.prediction

    @property
    def flow(self) -> bool:
        """Whether the process is rectified flow (else DDPM's)."""
        return self.prediction == "flow"

    @property
    def conditions_clean(self) -> bool:
        """Whether the model has learned a modality given clean at time 0 (and pure noise at the last time)."""
        return self.timesteps != "shared"


class OptimConfig(StrictModel):
    """The optimizer, its learning-rate schedule and the training step's precision (psunet.training)."""

    steps: int = Field(1000, ge=1, description="total optimizer steps")
    batch_size: int = Field(64, ge=1, description="per training worker at the most workers (run.num_workers' "
                            "maximum); the global batch, batch_size x that maximum, stays the same when "
                            "fewer workers run (gradient accumulation)")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay floor, as a fraction of lr")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.03, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the training step's precision: auto = bf16 autocast on GPU, fp32 on CPU; bf16 = bf16 "
        "autocast where the device multiplies bf16 in hardware (GPUs; CPUs with AVX512-BF16 or AMX), else fp32 "
        "with a warning")
    compile: bool = False
    seed: int = 0


def baseline_of(config: ModelConfig) -> ModelConfig:
    """The U-ViT-multi baseline at equal parameters: every modality-specific block moves to the shared part.

    A modality-specific in/out pair adds two blocks and one long-skip projection, exactly what two
    extra shared blocks add, so the parameter counts match.
    """
    moved = 2 * (config.n_text + config.n_image)
    return config.model_copy(update={"n_text": 0, "n_image": 0, "shared_depth": config.shared_depth + moved})


_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        latent_channels=4, latent_size=8, patch_size=2, text_len=16, word_dim=16,
        width=32, heads=2, n_text=1, n_image=1, shared_depth=1,
    ),
    "demo": ModelConfig(
        latent_channels=4, latent_size=8, patch_size=2, text_len=16, word_dim=32,
        width=192, heads=4, n_text=1, n_image=2, shared_depth=3,
    ),
    "coco256": ModelConfig(
        latent_channels=4, latent_size=32, patch_size=2, text_len=32, word_dim=128,
        width=768, heads=12, n_text=2, n_image=4, shared_depth=7,
    ),
}
_PRESETS.update({f"{name}-baseline": baseline_of(cfg) for name, cfg in list(_PRESETS.items())})

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str) -> ModelConfig:
    """A named model preset: tiny (tests), demo (CPU demo), coco256 (paper scale), each with a -baseline."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return _PRESETS[name].model_copy()
