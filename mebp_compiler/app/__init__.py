"""The training application on top of the compiler core: model loading and LoRA, data,
the training loop, evaluation and generation, MeZO, the comparison study, the Flower app,
run directories and checkpoints, plots and the `mebp` CLI.

Nothing in the core (`mebp_compiler`'s own modules, `passes`, `targets`) imports from here.
"""
