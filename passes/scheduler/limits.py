"""The scheduler's default search limit, importable without torch (the command line shows it in its help)."""

DEFAULT_WORK_LIMIT = 10.0  # CP-SAT deterministic time per solve (see `solver`'s module docstring)
