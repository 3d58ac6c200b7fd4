"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a directory, replaced whole on every save (`rundir.replaced`):

    lora.safetensors   the LoRA parameters, sealed with their own SHA-256 (`checksums`)
    state.pt           optimizer and LR-scheduler state, torch's RNG state (torch.save)
    state.json         the step, the data position (batches consumed), the run's settings, its
                       history so far and the SHA-256 of the two files above, sealed with its
                       own digest

Loading checks every digest first, so a checkpoint with changed or missing bytes is refused
in one line instead of resuming from a mix. A run resumed from a checkpoint with the same
settings and data continues bitwise as the uninterrupted run would have: the data stream is
replayed to the recorded position (`data.batches(skip=...)`), the optimizer, the schedule
and the RNG are restored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mebp_compiler.app import rundir
from mebp_compiler.checksums import (
    check_safetensors,
    placeholder_metadata,
    seal_json,
    seal_safetensors,
    sha256_path,
    unseal_json,
)
from mebp_compiler.files import atomic_write, atomic_write_json

CHECKPOINT_FORMAT = 1
LORA_FILE, STATE_FILE, INFO_FILE = "lora.safetensors", "state.pt", "state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, changed bytes, or written by another run."""


@dataclass
class Checkpoint:
    """A loaded checkpoint. `step` counts optimizer steps done; `batches_consumed` micro-batches read."""

    step: int
    batches_consumed: int
    settings: dict[str, Any]
    lora: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict | None
    rng_state: torch.Tensor
    history: dict  # `TrainHistory.to_json()` up to `step`

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Raise CheckpointError naming every setting that differs from those the checkpoint was written with."""
        keys = sorted(set(self.settings) | set(settings))
        differ = [f"{k} {self.settings.get(k)!r} there, {settings.get(k)!r} here" for k in keys
                  if self.settings.get(k) != settings.get(k)]
        if differ:
            raise CheckpointError(f"the checkpoint was written by a run with other settings ({'; '.join(differ)}); "
                                  "resume with the same ones, or start a new run")

    def restore(self, lora: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
        """Put the saved LoRA values, optimizer and scheduler state and RNG state back in place."""
        if set(lora) != set(self.lora):
            raise CheckpointError("the checkpoint holds other LoRA parameters than this model's; resume with the "
                                  "same --model, --lora-r, --lora-alpha, --lora-targets, --lora-layers and "
                                  "--modules-to-save")
        with torch.no_grad():
            for name, param in lora.items():
                param.copy_(self.lora[name])
        optimizer.load_state_dict(self.optimizer)
        if (scheduler is None) != (self.scheduler is None):
            raise CheckpointError("the checkpoint was written with another --lr-schedule / --warmup-steps")
        if scheduler is not None:
            scheduler.load_state_dict(self.scheduler)
        torch.set_rng_state(self.rng_state)


def save(directory: str | os.PathLike, *, step: int, batches_consumed: int, settings: dict[str, Any],
         lora: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler | None, history: dict | None = None) -> Path:
    """Write a checkpoint to `directory`, replacing any earlier one whole (an interrupted save keeps it)."""
    directory = Path(directory)
    with rundir.replaced(directory) as staging:
        tensors = {name: p.detach().contiguous() for name, p in lora.items()}
        atomic_write(staging / LORA_FILE, lambda tmp: (save_file(tensors, tmp, metadata=placeholder_metadata()),
                                                        seal_safetensors(tmp)))
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                 "rng_state": torch.get_rng_state()}
        atomic_write(staging / STATE_FILE, lambda tmp: torch.save(state, tmp))
        atomic_write_json(staging / INFO_FILE, seal_json({
            "format": CHECKPOINT_FORMAT, "step": step, "batches_consumed": batches_consumed, "settings": settings,
            "history": history or {},
            "files": {LORA_FILE: sha256_path(staging / LORA_FILE), STATE_FILE: sha256_path(staging / STATE_FILE)},
        }))
    return directory


def load(directory: str | os.PathLike) -> Checkpoint:
    """Read and check the checkpoint in `directory` (or in its `checkpoint/` subdirectory: a run directory).

    Raises:
        CheckpointError: no checkpoint there, or a file whose bytes differ from their checksum.
    """
    directory = Path(directory)
    if not (directory / INFO_FILE).is_file() and (directory / "checkpoint" / INFO_FILE).is_file():
        directory = directory / "checkpoint"
    info_path = directory / INFO_FILE
    if not info_path.is_file():
        raise CheckpointError(f"{directory} holds no checkpoint ({INFO_FILE} is missing); give the checkpoint "
                              "directory a run wrote with --checkpoint-every, or its run directory")
    try:
        info = json.loads(info_path.read_text())
    except (ValueError, UnicodeDecodeError):
        info = None
    digests = unseal_json(info)
    if digests is None:
        raise CheckpointError(f"{info_path} does not match its checksum: its bytes changed after it was written")
    if digests.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{info_path} is checkpoint format {digests.get('format')!r}; this mebp-compiler "
                              f"reads format {CHECKPOINT_FORMAT}")
    for name, digest in digests["files"].items():
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name} is missing; the checkpoint is not whole")
        if sha256_path(directory / name) != digest:
            raise CheckpointError(f"{directory / name} does not match its SHA-256 in {info_path}: its bytes "
                                  "changed after it was written")
    why = check_safetensors(directory / LORA_FILE)
    if why is not None:
        raise CheckpointError(f"{directory / LORA_FILE}: {why}")
    state = torch.load(directory / STATE_FILE, weights_only=True)
    return Checkpoint(step=digests["step"], batches_consumed=digests["batches_consumed"],
                      settings=digests["settings"], lora=load_file(directory / LORA_FILE),
                      optimizer=state["optimizer"], scheduler=state["scheduler"], rng_state=state["rng_state"],
                      history=digests["history"])

