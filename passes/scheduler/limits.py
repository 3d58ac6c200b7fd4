"""The scheduler's default search limit, importable without torch (the command line shows it in its help)."""

DEFAULT_WORK_LIMIT = 10.0  # CP-SAT deterministic time per solve (see `solver`'s module docstring)
#: A least-time search stops once its schedule is proven within this fraction of the plain step's
#: predicted time of the optimum (CP-SAT's absolute gap, deterministic with one worker). On
#: Qwen2.5-0.5B with MLP chunks and vocabulary slices the search is within 0.1% after a sixth of
#: its work limit and spends the rest proving the last 0.08%.
DEFAULT_STEP_GAP = 1e-3
