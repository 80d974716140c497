"""Sampler settings: one validated object that owns the defaults and the checks of every sampler knob.

    SamplerSettings(steps=15, scheduler="dpmsolver++", guidance_scale=3.0)       # one scale for both
    SamplerSettings(guidance_scale_image=5.0, guidance_scale_text=2.0, seed=7)  # a scale per modality

guidance_scale_image scales the guidance of the image's noise prediction (how strongly a known caption
steers the generated image), guidance_scale_text that of the text (how strongly a known image steers
the generated caption). `guidance_scale` sets both; a per-modality value given beside it wins. The
defaults differ: images are best guided (3), captions best unguided (1: the conditional prediction
alone; stronger text guidance breaks the sentences), measured in BENCHMARKS.md.
The pipeline, the jobs and the service read their defaults and checks from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from psunet.config import StrictModel
from psunet.diffusion import SCHEDULERS

MAX_STEPS = 1000


class SamplerSettings(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(35, ge=1, le=MAX_STEPS, description="sampler steps (the default: the fewest measured at which "
                       "every attribute of both directions is within 2 points of 50 steps for the demo's recipe; at "
                       "25 the captions' position is 2.7 points under; BENCHMARKS.md)")
    scheduler: str = Field("dpmsolver++", description=f"one of {', '.join(SCHEDULERS)}: dpmsolver++ samples every "
                           "model, ddim and ddpm the epsilon and v models, euler the flow models")
    spacing: Literal["trailing", "leading", "linspace"] = Field(
        "trailing", description="how the steps are spread over the training times (diffusers timestep_spacing); "
        "trailing starts at the last training time, where sampling starts from pure noise; flow models' "
        "schedulers space their own noise levels")
    guidance_scale_image: float = Field(3.0, ge=0, allow_inf_nan=False,
                                        description="classifier-free guidance of the generated image")
    guidance_scale_text: float = Field(1.0, ge=0, allow_inf_nan=False,
                                       description="classifier-free guidance of the generated text (1: none, the "
                                       "conditional prediction alone)")
    guidance_interval: tuple[float, float] = Field(
        (0.0, 1.0), description="guide only the steps whose noise level (the time as a share of the training times) "
        "lies in [low, high]; the others take the conditional prediction alone (Kynkaanniemi et al. 2024)")
    clamp_text: bool = Field(False, description="snap each step's clean-text estimate to the nearest vocabulary "
                             "word (Diffusion-LM's clamping), so the sampled text stays on words")
    text_eta: float = Field(1.0, ge=0, le=1, allow_inf_nan=False, description="fresh noise in each step of the "
                            "generated text (DDIM's eta; flow models only, ignored by epsilon and v models): the step "
                            "noises the text's clean estimate to the next noise level, with this share of that noise "
                            "drawn fresh and the rest the noise the estimate implies, so the words are decided afresh "
                            "at every step; 0 steps the text with the scheduler, like the image")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _one_scale_for_both(cls, data):
        if isinstance(data, dict) and "guidance_scale" in data:
            data = dict(data)
            scale = data.pop("guidance_scale")
            data.setdefault("guidance_scale_image", scale)
            data.setdefault("guidance_scale_text", scale)
        return data

    @field_validator("steps", mode="before")
    @classmethod
    def _whole_steps(cls, value):
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"steps must be a whole number, got {value!r}")
        return value

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 <= low < high <= 1:
            raise ValueError(f"guidance_interval must be [low, high] with 0 <= low < high <= 1, got {list(value)}")
        return value

    def guides_at(self, level: float) -> bool:
        """Whether guidance applies at this noise level (time / training times)."""
        low, high = self.guidance_interval
        return low <= level <= high

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {value!r}; choose one of {', '.join(SCHEDULERS)}")
        return value

    @property
    def guidance(self) -> tuple[float, float]:
        """(image, text) guidance scales."""
        return self.guidance_scale_image, self.guidance_scale_text

    def with_guidance(self, scale: float | tuple[float, float]) -> "SamplerSettings":
        """These settings with another guidance scale (one for both, or an (image, text) pair), checked."""
        image, text = scale if isinstance(scale, (tuple, list)) else (scale, scale)
        return SamplerSettings.model_validate({**self.model_dump(), "guidance_scale_image": image,
                                               "guidance_scale_text": text})

    def check_for(self, num_train_timesteps: int) -> "SamplerSettings":
        """Refuse more steps than the model has training times."""
        if self.steps > num_train_timesteps:
            raise ValueError(f"steps must be at most the model's {num_train_timesteps} training times, "
                             f"got {self.steps}")
        return self

    def describe(self) -> str:
        scale = f"{self.guidance_scale_image:g}" if self.guidance_scale_image == self.guidance_scale_text else \
            f"image {self.guidance_scale_image:g} / text {self.guidance_scale_text:g}"
        interval = "" if self.guidance_interval == (0.0, 1.0) else \
            f" on noise levels [{self.guidance_interval[0]:g}, {self.guidance_interval[1]:g}]"
        clamped = ", text clamped to words" if self.clamp_text else ""
        return (f"{self.steps} {self.scheduler} steps ({self.spacing}), guidance {scale}{interval}{clamped}, "
                f"text eta {self.text_eta:g}, seed {self.seed}")


def parse_guidance(text: str) -> list[float | tuple[float, float]]:
    """'1,3,5:2' -> [1.0, 3.0, (5.0, 2.0)]: guidance scales for both modalities, or image:text pairs."""
    scales = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        try:
            values = [float(value) for value in part.split(":")]
        except ValueError:
            raise ValueError(f"guidance scales must look like 1,3,5:2 (image:text pairs allowed), got {text!r}") from None
        if len(values) > 2:
            raise ValueError(f"guidance scale {part!r}: give one number or image:text")
        scales.append(values[0] if len(values) == 1 else tuple(values))
    return scales
