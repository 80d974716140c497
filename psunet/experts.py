"""eDiff-I expert denoisers: K PS-U-Nets, each owning an interval of diffusion times.

An ExpertEnsemble is called like one PSUNet. Each sample goes to the expert whose interval
[start, end) holds its noise level (a modality given clean or as pure noise does not count); a sampling step (one time for the whole batch) therefore costs one
expert's forward, the same as a single model. Experts are made by branching: copy a trained base
model into each and fine-tune each only on its interval (jobs/train.py --init-from --experts).

Intervals come from a binary split of [0, T) (the widest interval is halved, the noisier half first,
as eDiff-I branches the high-noise expert further) or are given explicitly; they must tile [0, T)
without gaps or overlaps.
"""

from __future__ import annotations

import torch
from torch import nn

from psunet.config import ModelConfig
from psunet.model import ModelOutput, PaintBias, PSUNet

Interval = tuple[int, int]


def binary_split(num_timesteps: int, count: int) -> list[Interval]:
    """K intervals tiling [0, T): halve the widest (the noisier on a tie) until there are K."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"experts: the number of experts must be an integer >= 1, got {count!r}")
    if count > num_timesteps:
        raise ValueError(f"experts: {count} experts cannot split {num_timesteps} diffusion times")
    intervals = [(0, num_timesteps)]
    while len(intervals) < count:
        widest = max(range(len(intervals)), key=lambda i: (intervals[i][1] - intervals[i][0], intervals[i][0]))
        start, end = intervals.pop(widest)
        middle = (start + end) // 2
        intervals[widest:widest] = [(start, middle), (middle, end)]
    return intervals


def check_intervals(intervals, num_timesteps: int) -> list[Interval]:
    """Explicit intervals as [[start, end), ...] tiling [0, T) in order; a gap or an overlap is named."""
    pairs = [tuple(pair) for pair in intervals]
    if not pairs:
        raise ValueError("experts: no intervals given (at least one expert is needed)")
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(v, int) for v in pair) or pair[0] >= pair[1]:
            raise ValueError(f"experts: interval {list(pair)} must be [start, end) integers with start < end")
    if pairs[0][0] != 0 or pairs[-1][1] != num_timesteps:
        raise ValueError(f"experts: intervals must cover [0, {num_timesteps}) (the training times), "
                         f"got [{pairs[0][0]}, {pairs[-1][1]})")
    for (_, end), (start, _) in zip(pairs, pairs[1:]):
        if start > end:
            raise ValueError(f"experts: intervals leave a gap: times {end}..{start - 1} belong to no expert")
        if start < end:
            raise ValueError(f"experts: intervals overlap: times {start}..{end - 1} belong to two experts")
    return pairs


def parse_intervals(text: str) -> list[list[int]]:
    """'0:500,500:1000' -> [[0, 500], [500, 1000]] (the command-line form)."""
    try:
        return [[int(v) for v in part.split(":")] for part in text.split(",")]
    except ValueError:
        raise ValueError(f"experts: intervals must look like 0:500,500:1000, got {text!r}") from None


class ExpertEnsemble(nn.Module):
    def __init__(self, config: ModelConfig, intervals: list[Interval]):
        super().__init__()
        self.config = config
        self.intervals = [tuple(pair) for pair in intervals]
        self.experts = nn.ModuleList(PSUNet(config) for _ in self.intervals)
        self.register_buffer("starts", torch.tensor([start for start, _ in self.intervals[1:]]), persistent=False)

    def expert_index(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) index of the expert that owns each time (an interval includes its start, excludes its end)."""
        return torch.bucketize(timesteps, self.starts.to(timesteps.dtype), right=True)

    def routing_times(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) the time each sample is routed by, from (image times, text times).

        A modality given clean (time 0) or as pure noise (the last time) is conditioning, not the noise level
        being removed: the other modality's time counts. Two different noise levels have no one owner.
        """
        first, second = timesteps
        last = self.intervals[-1][1] - 1
        special_first = (first == 0) | (first == last)
        special_second = (second == 0) | (second == last)
        if bool(((first != second) & ~special_first & ~special_second).any()):
            raise ValueError("expert denoisers route by one noise level per sample; got two different image and "
                             "text times (diffusion.timesteps: independent is not supported with experts)")
        return torch.where(special_first & ~special_second, second,
                           torch.where(special_second & ~special_first, first, torch.minimum(first, second)))

    def forward(self, image_latents: torch.Tensor, text_vectors: torch.Tensor, timesteps: torch.Tensor,
                paint: PaintBias | None = None,
                estimate: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModelOutput:
        times = self.routing_times(timesteps) if timesteps.dim() == 2 else timesteps
        index = self.expert_index(times)
        first = int(index[0])
        if bool((index == first).all()):
            return self.experts[first](image_latents, text_vectors, timesteps, paint, estimate)
        eps_image = torch.empty_like(image_latents)
        eps_text = torch.empty_like(text_vectors)
        for expert in index.unique().tolist():
            rows = (index == expert).nonzero().flatten()
            part = None if paint is None else PaintBias(paint.mask[rows], paint.strength[rows])
            rows_estimate = None if estimate is None else (estimate[0][rows], estimate[1][rows])
            out = self.experts[expert](image_latents[rows], text_vectors[rows], timesteps[..., rows], part,
                                       rows_estimate)
            eps_image[rows] = out.eps_image.to(eps_image.dtype)
            eps_text[rows] = out.eps_text.to(eps_text.dtype)
        return ModelOutput(eps_image=eps_image, eps_text=eps_text)
