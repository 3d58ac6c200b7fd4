"""A trained adapter after training: load it on its base model, generate with it, merge it into the base."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mebp_compiler.app import models, rundir
from mebp_compiler.files import write_error


def load_model(name: str, adapter: str | os.PathLike | None = None, *, seed: int = 0) -> torch.nn.Module:
    """The model `name` (`models.load`), with the peft adapter directory `adapter` on it when given, in eval mode.

    Raises:
        FileNotFoundError: `adapter` is not a peft adapter directory (no adapter_config.json).
    """
    from peft import PeftModel

    model = models.load(name, seed=seed)
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json); give the "
                                    "adapter/ directory that `mebp train` wrote")
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def tokenizer_for(name: str) -> Any:
    """The model's own tokenizer (`models.load_tokenizer`), or UTF-8 bytes (`data.ByteTokenizer`) where it has none."""
    from mebp_compiler.app.data import ByteTokenizer

    return models.load_tokenizer(name) if models.has_tokenizer(name) else ByteTokenizer()


def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 40,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
    """The text `model` continues `prompt` with (transformers' `generate`), without the prompt.

    `temperature` 0 is greedy decoding; above 0, sampling at that temperature with nucleus
    `top_p`, from torch's RNG seeded with `seed` (the same seed gives the same text).
    """
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.int64)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give some text to continue")
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=getattr(tokenizer, "eos_token_id", None) or 0, use_cache=True,
                             **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def merge(name: str, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Merge `adapter` into the weights of `name` (peft's `merge_and_unload`) and save the plain
    transformers model to `out` (safetensors, with its config; and the tokenizer, where it has one).

    `out` is replaced whole (`rundir.replaced`): an interrupted merge leaves the old directory.
    """
    merged = load_model(name, adapter).merge_and_unload()
    out = Path(out)
    with rundir.replaced(out) as staging:
        try:
            merged.save_pretrained(staging, safe_serialization=True)
            if models.has_tokenizer(name):
                models.load_tokenizer(name).save_pretrained(staging)
        except OSError as exc:
            raise write_error(staging, exc) from exc
    return out
