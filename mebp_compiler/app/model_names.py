"""The names of the model zoo (`mebp_compiler.app.models`), importable without torch or transformers.

The command line lists and checks them before it loads anything heavy.
"""

from __future__ import annotations

import difflib

MODEL_NAMES: tuple[str, ...] = (
    "smollm2-135m",
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-3b",
    "gemma3-1b",
    "gemma3-4b",
    "llama3.2-1b",
    "tiny-llama",
    "tiny-qwen2",
    "tiny-gemma3",
)
"""Names accepted by :func:`config` and :func:`load`."""


class UnknownModelError(ValueError):
    """Raised by :func:`config` and :func:`load` for a name not in :data:`MODEL_NAMES`.

    Attributes:
        name: the name that was asked for.
        suggestion: the closest known name (difflib), or ``None`` if none is close.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        matches = difflib.get_close_matches(name.lower(), MODEL_NAMES, n=1, cutoff=0.4)
        self.suggestion: str | None = matches[0] if matches else None
        hint = f" Did you mean {self.suggestion!r}?" if self.suggestion else ""
        super().__init__(
            f"unknown model {name!r}.{hint} Known models: {', '.join(MODEL_NAMES)}; or give a "
            f"directory saved with save_pretrained, a .gguf file, or a Hugging Face id (org/name) in the "
            f"local cache."
        )
