"""`compact_model.pt`: saving a compact model and rebuilding it.

The file holds the compact `state_dict` and the run's config, not a pickled module
(whole-model pickles break when code moves): `load_compact` rebuilds the model from the
config, shrinks its layers to the saved shapes and loads the weights, so it reloads with
`torch.load(weights_only=True)` and stays trainable. Submodules export removed because no
output reads them are listed by name (`unreached`) and removed again before loading.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mtlsparse.builders import build_run_model
from mtlsparse.compaction.errors import ExportError
from mtlsparse.compaction.surgery import INPUT_INDEX, Unreached, attach_input_gather_, remove_modules_

FORMAT = "mtlsparse-compact/1"


def save_compact(model: nn.Module, path: str | Path, config: DictConfig | dict | None = None) -> None:
    """Save the compact state_dict with the config that rebuilds its architecture."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=False)
    config = {k: v for k, v in (config or {}).items() if k != "hydra"}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    unreached = [name for name, module in model.named_modules() if isinstance(module, Unreached)]
    torch.save({"format": FORMAT, "state_dict": model.state_dict(), "config": config, "unreached": unreached}, tmp)
    tmp.replace(path)


def shrink_to_(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Resize `model`'s parameters/buffers to the shapes in `state_dict` and fix layer attributes."""
    modules = dict(model.named_modules())
    for key, value in state_dict.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if name == INPUT_INDEX and isinstance(module, nn.Linear) and not hasattr(module, INPUT_INDEX):
            attach_input_gather_(module, value)
            continue
        current = getattr(module, name, None)
        if not isinstance(current, Tensor) or current.shape == value.shape:
            continue
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(torch.empty_like(value), requires_grad=current.requires_grad)
        else:
            module._buffers[name] = torch.empty_like(value)
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            module.out_channels = module.weight.shape[0]
            module.groups = module.out_channels if depthwise else module.groups
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            source = module.running_mean if module.running_mean is not None else module.weight
            if source is not None:
                module.num_features = source.shape[0]
    return model


def load_compact(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a compact model saved by `save_compact`: dense model (`model`, or built from the
    saved config) → layers shrunk to the saved shapes → weights loaded."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ExportError(f"{path} is not a compact model saved by mtlsparse export ({FORMAT})")
    if model is None:
        if not saved["config"]:
            raise ExportError(f"{path} was saved without a config: pass the dense model to rebuild")
        model, _ = build_run_model(OmegaConf.create(saved["config"]))
    remove_modules_(model, saved.get("unreached", []))  # (files saved before export removed any: none)
    shrink_to_(model, saved["state_dict"])
    model.load_state_dict(saved["state_dict"], strict=True)
    return model.eval()
