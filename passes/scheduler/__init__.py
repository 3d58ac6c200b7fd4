"""The scheduler: keep / recompute / offload per tensor under a hard memory budget."""
