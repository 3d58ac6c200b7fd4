"""Code generators: each target consumes a Plan and writes artifacts.

Every target module `targets/<name>.py` exposes
`export_stage(stage, example_inputs, path) -> Path` (write one stage's fx graph as an
artifact; `path` has no suffix, the target adds its own and returns what it wrote) and
`load_stage(path) -> Callable[[list[np.ndarray]], list[np.ndarray]]` (raising
`TargetUnavailableError` where the target cannot run); optionally `describe_stage(path)`
(input and output shapes and dtypes, checked against the manifest before any compute),
`io_form(shape, dtype)` (the shape and dtype an artifact takes or gives for a stage tensor,
when the runtime's I/O types differ from torch's) and `verify_artifacts(partition,
directory, arrays)` (what `mebp compile` checks after export where the target cannot run).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Target name -> (module implementing it, what it writes and what is verified where).
TARGETS: dict[str, tuple[str, str]] = {
    "onnx": ("mebp_compiler.targets.onnx",
             "one .onnx file (opset 18) per distinct stage; runs here with onnxruntime (`mebp run`), "
             "where loss and LoRA gradients are checked against autograd by the tests"),
    "mlx": ("mebp_compiler.targets.mlx",
            "one .mlxfn file (mx.export_function, what MLX-Swift imports on iOS) per distinct stage; "
            "runs here with mlx[cpu] (`mebp run`), where loss and LoRA gradients are checked against "
            "autograd by the tests; not run here: MLX-Swift on a device"),
    "coreml": ("mebp_compiler.targets.coreml",
               "one ML Program .mlpackage (iOS 17, fp32) per distinct stage; built, saved, reloaded and "
               "checked here - signature, op set, and each stage's values by MIL value inference against "
               "the torch stage (report: coreml-check.json) - but predictions need macOS/iOS, so `mebp run` "
               "refuses it here"),
}


class TargetUnavailableError(RuntimeError):
    """The target's artifacts cannot run on this machine (e.g. Core ML off macOS); the message says where they can."""


def load_target(name: str) -> ModuleType:
    """The module of target `name`; ValueError naming the known targets otherwise."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[name][0])
