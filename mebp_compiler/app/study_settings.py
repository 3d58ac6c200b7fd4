"""What the convergence study (`app.compare`, `mebp compare`) runs, importable without torch.

`mebp compare` builds its flags' defaults from `StudySettings` and checks them with
`StudySettings.check` before anything heavy is imported, so its argument errors answer at
once; `app.compare` runs the study.
"""

from __future__ import annotations

from dataclasses import dataclass

from mebp_compiler.passes.scheduler.limits import DEFAULT_WORK_LIMIT

METHODS = ("mebp", "optimal", "mezo")
LABELS = {
    "mebp": "backprop, mebp plan",
    "optimal": "backprop, optimal schedule",
    "mezo": "MeZO",
}


@dataclass
class StudySettings:
    """What the study runs. Equal `seq_len` and `batch_size` for every method.

    Backprop is evaluated at `eval_steps(steps, eval_every)`. `mezo_steps=None` gives MeZO
    the same training wall time as the first backprop method (it steps until its summed
    step time reaches that run's, and is evaluated when it passes that run's evaluation
    times); a number gives it exactly that many steps, evaluated at
    `eval_steps(mezo_steps, eval_every * mezo_steps / steps)`. `budget=None` runs the
    optimal schedule at the mebp plan's predicted peak plus AdamW's state.
    """

    seq_len: int = 128
    batch_size: int = 1
    steps: int = 150
    mezo_steps: int | None = None
    eval_every: int = 25
    eval_blocks: int = 24
    eval_batch_size: int = 4
    heldout_fraction: float = 0.1
    lr: float = 2e-3
    mezo_lr: float = 1e-3  # SmolLM2 probe, 60 steps: 1e-2 diverged, 1e-3 beat 1e-4 (README)
    mezo_eps: float = 1e-3
    budget: str | int | None = None
    device: str = "cpu-local"
    head_chunks: int = 0
    work_limit: float = DEFAULT_WORK_LIMIT  # the scheduler's, CP-SAT deterministic time
    seed: int = 0
    methods: tuple[str, ...] = METHODS

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot run."""
        for name in ("seq_len", "batch_size", "steps", "eval_every", "eval_blocks", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mezo_steps is not None and self.mezo_steps < 1:
            raise ValueError(f"mezo_steps must be >= 1, got {self.mezo_steps}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct names from {', '.join(METHODS)}, got {list(self.methods)}")
        if "mezo" in self.methods and self.mezo_steps is None:
            if not self.backprop_methods:
                raise ValueError("MeZO alone has no backprop run to match the wall time of: give mezo_steps "
                                 "(--mezo-steps)")
            if self.methods.index("mezo") < self.methods.index(self.backprop_methods[0]):
                raise ValueError("MeZO gets the wall time of the first backprop run, so list it after one "
                                 "(e.g. mebp,mezo), or give mezo_steps (--mezo-steps)")
        if self.mezo_eps <= 0 or self.mezo_lr <= 0 or self.lr <= 0:
            raise ValueError("lr, mezo_lr and mezo_eps must be > 0")

    @property
    def backprop_methods(self) -> list[str]:
        return [m for m in self.methods if m != "mezo"]

    @property
    def mezo_budget(self) -> str:
        if self.mezo_steps is not None:
            return f"{self.mezo_steps} steps"
        return f"the training wall time of '{LABELS[self.backprop_methods[0]]}'"
