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
