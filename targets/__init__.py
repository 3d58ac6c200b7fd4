"""Code generators: each target consumes a Plan and writes artifacts.

Every target module `targets/<name>.py` exposes
`export_stage(stage, example_inputs, path) -> Path` (write one stage's fx graph as an
artifact; `path` has no suffix, the target adds its own and returns what it wrote) and
`load_stage(path) -> Callable[[list[np.ndarray]], list[np.ndarray]]`; optionally
`describe_stage(path)` (input and output shapes and dtypes, checked against the manifest
before any compute) and `DESCRIPTION` (one line for `mebp compile --help`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Target name -> (module implementing it, what it writes and what is verified where).
TARGETS: dict[str, tuple[str, str]] = {
    "onnx": ("mebp_compiler.targets.onnx",
             "one .onnx file (opset 18) per distinct stage; runs here with onnxruntime (`mebp run`), "
             "where loss and LoRA gradients are checked against autograd by the tests"),
}


def load_target(name: str) -> ModuleType:
    """The module of target `name`; ValueError naming the known targets otherwise."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[name][0])
