"""Where a causal LM keeps its repeated decoder blocks: the unit that capture checkpoints.

Block discovery belongs to the compiler core (capture needs it for any model); loading
models and adding LoRA belong to the application (`mebp_compiler.app.models`).
"""

from __future__ import annotations

import peft
import torch


class NoDecoderBlocksError(TypeError, ValueError):
    """The model has no stack of repeated decoder blocks that mebp can checkpoint."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | torch.nn.Sequential:
    """The decoder blocks of a causal LM, peft-wrapped or not, in execution order.

    The blocks are found wherever they live (``model.layers``, ``transformer.h``,
    ``gpt_neox.layers``, ...): of the ``ModuleList``/``Sequential`` containers in the model
    whose every child is a block - a module with at least two parametrized submodules of
    its own, not one of peft's LoRA wrappers - the one holding the most parameters. That
    is the decoder stack (an MoE's expert list sits inside one of its blocks, so holds
    fewer). That the forward runs them once each, in order, is checked when the step is
    traced (`capture`).

    Raises:
        NoDecoderBlocksError: no such container (the message names the model class).
    """
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    best, best_params = None, 0
    for module in base.modules():
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) or len(module) == 0:
            continue
        if not all(_is_block(child) for child in module):
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = module, params
    if best is None:
        raise NoDecoderBlocksError(
            f"cannot find the decoder layers of {type(base).__name__}: expected a ModuleList of "
            f"repeated decoder blocks (each with its own attention/MLP submodules) somewhere in "
            f"the model"
        )
    return best


def _is_block(module: torch.nn.Module) -> bool:
    """A module made of at least two submodules that hold parameters (a LoRA wrapper is not)."""
    if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer):
        return False
    with_params = [child for child in module.children() if any(True for _ in child.parameters())]
    return len(with_params) >= 2


def block_mlp(block: torch.nn.Module) -> torch.nn.Module | None:
    """The MLP (feed-forward) submodule of a decoder block, or None if it has none by a known name."""
    for name in ("mlp", "feed_forward", "ffn", "ff"):
        child = getattr(block, name, None)
        if isinstance(child, torch.nn.Module):
            return child
    return None
