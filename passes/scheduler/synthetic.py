"""Synthetic training-step DAGs for testing the scheduler without tracing a model."""

from __future__ import annotations

import random

import networkx as nx


def transformer_like_dag(blocks: int = 2, ops_per_block: int = 4, seed: int = 0,
                         identical_blocks: bool = True) -> nx.DiGraph:
    """A DAG shaped like a training step: a chain of blocks with skip edges, then its backward.

    Each forward op reads the previous op and, every other op, the op before that (a
    residual). Its backward op reads the incoming gradient and the forward tensors the
    op needs (its inputs), so those are saved. Sizes are random in [1, 64] MiB and
    compute times in [1, 20] ms; with `identical_blocks` every block draws the same
    numbers, as a transformer's repeated layers do.
    """
    rng = random.Random(seed)
    mib = 2**20
    dag = nx.DiGraph()
    dag.add_node("weights", size_bytes=32 * mib, compute_s=0.0, phase="input")
    block_draws = [[(rng.randint(1, 64) * mib, rng.randint(1, 20) / 1000) for _ in range(ops_per_block)]]
    for _ in range(blocks - 1):
        block_draws.append(block_draws[0] if identical_blocks else
                           [(rng.randint(1, 64) * mib, rng.randint(1, 20) / 1000) for _ in range(ops_per_block)])
    forward = []
    for b in range(blocks):
        for i in range(ops_per_block):
            name = f"f{b}_{i}"
            size, seconds = block_draws[b][i]
            dag.add_node(name, size_bytes=size, compute_s=seconds, phase="forward", block=b)
            dag.add_edge(forward[-1] if forward else "weights", name)
            if i % 2 == 1 and len(forward) >= 2:
                dag.add_edge(forward[-2], name)
            forward.append(name)
    grad = None
    for name in reversed(forward):
        g = f"g_{name}"
        b = dag.nodes[name]["block"]
        dag.add_node(g, size_bytes=dag.nodes[name]["size_bytes"], compute_s=2 * dag.nodes[name]["compute_s"],
                     phase="backward", segment=b)
        for saved in dag.predecessors(name):
            if dag.nodes[saved]["phase"] == "forward":
                dag.add_edge(saved, g)
        dag.add_edge(grad or name, g)
        dag.add_edge("weights", g)
        grad = g
    dag.nodes[grad]["output"] = True
    return dag


def random_layered_dag(layers: int = 6, width: int = 3, seed: int = 0, reads: int = 2) -> nx.DiGraph:
    """A random layered training-step DAG, as Moccasin's (Bartan et al., ICML 2023) benchmarks draw them.

    Each forward op of layer l reads up to `reads` ops of earlier layers (at least one of
    layer l-1), so a tensor may have forward readers far downstream. Its backward op reads
    the incoming gradients of its readers and, by a coin flip, its own inputs (as a
    matmul's does) or its own output (as an activation's does), so a forward reader of a
    tensor may be needed in the backward long after the tensor itself. Sizes are random
    in [1, 64] MiB, compute times in [1, 20] ms. Every backward op forms its own segment.
    """
    rng = random.Random(seed)
    mib = 2**20
    dag = nx.DiGraph()
    dag.add_node("x", size_bytes=4 * mib, compute_s=0.0, phase="input")
    by_layer = [["x"]]
    forward = []
    for layer in range(layers):
        names = []
        for i in range(width):
            name = f"f{layer}_{i}"
            dag.add_node(name, size_bytes=rng.randint(1, 64) * mib, compute_s=rng.randint(1, 20) / 1000,
                         phase="forward")
            earlier = [n for nodes in by_layer[:-1] for n in nodes]
            inputs = {rng.choice(by_layer[-1])} | set(rng.sample(earlier, min(len(earlier), reads - 1)))
            for u in sorted(inputs):
                dag.add_edge(u, name)
            names.append(name)
            forward.append(name)
        by_layer.append(names)
    loss = "loss"
    dag.add_node(loss, size_bytes=4, compute_s=0.001, phase="forward", output=True)
    for name in by_layer[-1]:
        dag.add_edge(name, loss)
    grad_of = {loss: None}
    for name in [loss, *reversed(forward)]:
        g = f"g_{name}"
        dag.add_node(g, size_bytes=dag.nodes[name]["size_bytes"], compute_s=2 * dag.nodes[name]["compute_s"],
                     phase="backward", segment=g)
        for reader in dag.successors(name):
            if reader in grad_of and grad_of[reader] is not None:
                dag.add_edge(grad_of[reader], g)
        if name == loss or rng.random() < 0.5:
            for saved in dag.predecessors(name):
                if dag.nodes[saved]["phase"] == "forward":
                    dag.add_edge(saved, g)
        else:
            dag.add_edge(name, g)
        grad_of[name] = g
    for name in forward:
        if not any(dag.nodes[s]["phase"] == "backward" for s in dag.successors(f"g_{name}")):
            dag.nodes[f"g_{name}"]["output"] = True
    return dag
