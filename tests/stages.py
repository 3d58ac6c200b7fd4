"""Stages cut by hand from a captured step, for testing the stage exporters before a partition pass.

A stage is a GraphModule whose placeholders are its external inputs and whose output is a
tuple of the values it produces that something outside it reads.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx

from mebp_compiler.capture import capture
from mebp_compiler.ir import Phase, TrainingGraph


def step_inputs(model: torch.nn.Module, graph: TrainingGraph, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The whole step's input tensors, in placeholder order, from the model's weights and the batch."""
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    state.update(batch)
    return [state[spec.source].detach() for spec in graph.inputs]


def node_values(graph: TrainingGraph, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every node's value when the whole step runs on `inputs`."""
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = result = super().run_node(n)
            return result

    with torch.no_grad():
        Recorder(graph.module).run(*inputs)
    return values


def block_nodes(graph: TrainingGraph, block: int, phase: Phase) -> set[str]:
    """Names of the ops of one block in one phase, with the getitems of any multi-output op among them."""
    names = set(graph.names_in_block(block, phase))
    for node in graph.module.graph.nodes:
        if node.target is operator.getitem and node.args[0].name in names:
            names.add(node.name)
    return names


def extract_stage(graph: TrainingGraph, names: set[str], values: dict[str, torch.Tensor]
                  ) -> tuple[fx.GraphModule, list[torch.Tensor], list[torch.Tensor]]:
    """The stage computing `names`: (module, example inputs, expected outputs from the whole step)."""
    nodes = [n for n in graph.module.graph.nodes if n.name in names]
    inside = set(nodes)
    stage = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    external = [a for n in nodes for a in n.all_input_nodes if a not in inside]
    for a in dict.fromkeys(external):
        env[a] = stage.placeholder(a.name)
        env[a].meta = dict(a.meta)
    inputs = [values[a.name] for a in env]
    for node in nodes:
        env[node] = stage.node_copy(node, env.__getitem__)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)
               and isinstance(n.meta.get("val"), torch.Tensor)]
    stage.output(tuple(env[n] for n in outputs))
    module = fx.GraphModule(graph.module, stage)
    return module, inputs, [values[n.name] for n in outputs]


@functools.lru_cache(maxsize=4)
def captured_step(model: torch.nn.Module | str, seq: int = 24, batch: int = 1, seed: int = 0
                  ) -> tuple[TrainingGraph, dict[str, torch.Tensor]]:
    """(graph, every node's value) of one step on a random batch, cached so that tests cutting
    several stages from one model capture it once (callers must not mutate them). `model`
    is a LoRA model or the name of a tiny config (built by tests.conftest.lora_model)."""
    from tests.conftest import lora_model, random_batch

    if isinstance(model, str):
        model = lora_model(model)
    example = random_batch(model.config.vocab_size, batch=batch, seq=seq, seed=seed)
    graph = capture(model, example)
    return graph, node_values(graph, step_inputs(model, graph, example))
