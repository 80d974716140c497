"""Checkpoint folders without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint folder holds
    model.safetensors       live weights
    ema.safetensors         EMA weights (what sampling uses by default)
    optimizer.safetensors   optimizer tensors, keyed "<param index>.<name>"; the rest of the
                            optimizer state (param groups, hyper-parameters) goes in state.json
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, EMA update count, data position, optimizer groups
    config.json             the model and diffusion configs (and anything else the caller adds); an
                            expert ensemble adds "experts": {"intervals": [[start, end), ...]}
    assets.json             the shards' autoencoder and word vectors (psunet.model_folder.assets_for)

psunet.model_folder loads a checkpoint for sampling and bundles it into a model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def save_weights(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Tensors to a safetensors file; a write the disk refuses (full, no permission) raises OSError."""
    try:
        save_file(_contiguous(state), str(path))
    except SafetensorError as exc:  # the library's I/O errors are not OSErrors
        raise OSError(f"{exc} ({path})") from exc


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value for index, entries in state["state"].items()
               for name, value in entries.items()}
    groups = [{key: (list(value) if isinstance(value, tuple) else value) for key, value in group.items()}
              for group in state["param_groups"]]
    return tensors, groups


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    template = optimizer.state_dict()["param_groups"]
    restored = [{key: (tuple(value) if isinstance(old.get(key), tuple) else value) for key, value in group.items()}
                for group, old in zip(groups, template)]
    optimizer.load_state_dict({"state": state, "param_groups": restored})


def save_checkpoint(folder: str | Path, model: torch.nn.Module, ema_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None, state: dict, config: dict) -> Path:
    """Write a complete training checkpoint into `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / "model.safetensors", model.state_dict())
    save_weights(folder / "ema.safetensors", ema_state)
    state = dict(state)
    if optimizer is not None:
        tensors, groups = optimizer_to_files(optimizer)
        save_weights(folder / "optimizer.safetensors", tensors)
        state["optimizer_groups"] = groups
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_weights(folder / "rng.safetensors", rng)
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_state(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "state.json").read_text())


def restore_training(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Load live weights, optimizer and RNG state into the given objects; return (state, ema weights)."""
    folder = Path(folder)
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
    state = load_state(folder)
    optimizer_from_files(optimizer, load_file(str(folder / "optimizer.safetensors"), device=str(device)),
                         state["optimizer_groups"])
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda_states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    return state, load_file(str(folder / "ema.safetensors"), device=str(device))
