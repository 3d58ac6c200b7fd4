"""The scheduling problem on a plain DAG: what may be kept, recomputed or offloaded, and when memory counts.

Input is a `networkx.DiGraph` of a whole training step whose node insertion order is the
execution order (graph inputs, then forward ops, then backward ops). Node attributes:

- `size_bytes` (int): bytes of the tensor the node produces.
- `compute_s` (float): seconds to compute it.
- `phase`: "input", "forward" or "backward" (inputs may appear anywhere; they are
  held for the whole step).
- `offloadable` (bool, default True): a forward tensor that may be written to flash.
- `segment` (backward nodes, default: the node itself): backward nodes of one segment run
  together (e.g. one transformer block's backward); recomputations and reloads for a
  segment are modelled as happening at its start.
- `output` (bool, default False): held until the end of the step (loss, gradients).
- `just_in_time` (bool, default False): if recomputed, the tensor is rebuilt right before
  its first backward use rather than at the start of that segment (a decompressed
  weight); in a restore phase it lives only as long as the recomputations that read it.
- `block` (forward nodes, optional int): the repeated block (e.g. transformer layer) the
  node belongs to. Blocks whose decidable tensors match one for one (sizes, costs, what
  they read) are *equal*; `SchedulingProblem.equal_blocks` lists them, so a solver may
  give equal blocks equal decisions.

An edge u -> v means v reads u. The realisation the model describes is the one
`passes.policies.sequence_from_decisions` emits: the forward as traced, the backward as
traced, each forward tensor the backward needs either kept, reloaded or recomputed
before its first use. The memory the model predicts at every point is an upper bound of
what that sequence holds (recomputations happen no earlier than the start of their
segment), so a schedule that fits the model fits for real.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import numpy as np


class ProblemError(ValueError):
    """The DAG does not describe a training step the scheduler understands."""


@dataclass(frozen=True)
class HeldForRecomputation:
    """A tensor past its last backward use, held at a checkpoint only for a reader's recomputation.

    It is held there iff one of `readers` (forward readers whose segments restore at or
    after this point) is recomputed: their recomputation needs it, kept or brought back.
    """

    tensor: str
    readers: tuple[str, ...]


@dataclass
class Checkpoint:
    """One memory constraint: fixed + sum(size * keep) + sum(size * (recompute + offload))
    + sum(size * held for a recomputation) <= budget."""

    position: int
    fixed_bytes: int
    kept: list[str]  # decidable tensors held at this point if kept
    materialized: list[str]  # decidable tensors held at this point if recomputed or reloaded
    for_recomputation: list[HeldForRecomputation] = field(default_factory=list)


@dataclass
class SchedulingProblem:
    """Decidable forward tensors, their costs, and the memory checkpoints of the step."""

    size: dict[str, int]
    compute_s: dict[str, float]
    offloadable: dict[str, bool]
    saved: set[str]  # read by the backward: must be kept, offloaded or recomputed
    needs: dict[str, list[str]]  # decidable tensor -> decidable forward tensors it reads
    group: dict[str, int]  # restore position of the segment where it is first needed
    last_use: dict[str, int]  # last position that reads it (backward use or a recomputation)
    position: dict[str, int]  # timeline position of every computed node
    checkpoints: list[Checkpoint]
    base_compute_s: float
    # Classes of two or more equal blocks; a block is its decidable tensors in forward
    # order, so the i-th tensors of a class's blocks correspond.
    equal_blocks: list[list[list[str]]] = field(default_factory=list)
    _rows: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def decidable(self) -> list[str]:
        return list(self.size)

    def memory_rows(self) -> MemoryRows:
        """The checkpoints as index arrays (`MemoryRows`), built on first use and again only when
        `checkpoints` was replaced or changed length since."""
        key = (id(self.checkpoints), len(self.checkpoints), len(self.size))
        if self._rows is None or self._rows[0] != key:
            self._rows = (key, MemoryRows.of(self))
        return self._rows[1]

    @property
    def ties(self) -> dict[str, str]:
        """Tensor of an equal block -> its counterpart in the first block of its class."""
        return {v: t for blocks in self.equal_blocks for block in blocks[1:] for v, t in zip(block, blocks[0])}


@dataclass(frozen=True)
class MemoryRows:
    """Every checkpoint's terms as indices, row after row (CSR layout), for evaluating decisions
    in bulk and writing the memory constraints without a lookup per term.

    Tensors are numbered in `SchedulingProblem.decidable` order, the distinct
    `HeldForRecomputation` terms in order of first appearance (checkpoint by checkpoint).
    Row c's kept tensors are `kept[kept_start[c]:kept_start[c + 1]]`, in `Checkpoint.kept`
    order; likewise `materialized` and `held` (indices into `terms`).
    """

    fixed: np.ndarray  # bytes per checkpoint, int64
    kept: np.ndarray
    kept_start: np.ndarray
    materialized: np.ndarray
    materialized_start: np.ndarray
    held: np.ndarray
    held_start: np.ndarray
    terms: list[HeldForRecomputation]

    @staticmethod
    def of(problem: SchedulingProblem) -> MemoryRows:
        index = {v: i for i, v in enumerate(problem.size)}
        term_index: dict[HeldForRecomputation, int] = {}  # equal terms are one term
        kept, materialized, held = [], [], []
        for c in problem.checkpoints:
            kept.append(list(map(index.__getitem__, c.kept)))
            materialized.append(list(map(index.__getitem__, c.materialized)))
            held.append([term_index.setdefault(h, len(term_index)) for h in c.for_recomputation])
        terms = list(term_index)
        return MemoryRows(np.array([c.fixed_bytes for c in problem.checkpoints], dtype=np.int64),
                          *_csr(kept), *_csr(materialized), *_csr(held), terms)


def _csr(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of indices as (all indices, where each row starts; one more entry than rows)."""
    start = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=start[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(start[-1]))
    return flat, start


def row_sums(values: np.ndarray, columns: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Per row, the sum of `values` at the row's column indices (exact, int64)."""
    total = np.zeros(len(columns) + 1, dtype=np.int64)
    np.cumsum(values[columns], out=total[1:])
    return total[start[1:]] - total[start[:-1]]


def build_problem(dag: nx.DiGraph) -> SchedulingProblem:
    """Turn a training-step DAG (see module docstring) into a SchedulingProblem."""
    order = list(dag.nodes)
    phase = {n: dag.nodes[n].get("phase") for n in order}
    rank = {"input": 0, "forward": 1, "backward": 2}
    for n in order:
        if phase[n] not in rank:
            raise ProblemError(f"node {n!r} has phase {phase[n]!r}; use 'input', 'forward' or 'backward'")
        for key in ("size_bytes", "compute_s"):
            if key not in dag.nodes[n]:
                raise ProblemError(f"node {n!r} lacks the attribute {key!r}")
    index = {n: i for i, n in enumerate(order)}
    for u, v in dag.edges:
        if index[u] >= index[v]:
            raise ProblemError(f"edge {u!r} -> {v!r} goes backwards in the node order; "
                               "insert nodes in execution (topological) order")
    computed = [n for n in order if phase[n] != "input"]
    for a, b in zip(computed, computed[1:]):
        if rank[phase[a]] > rank[phase[b]]:
            raise ProblemError(f"node {b!r} ({phase[b]}) comes after {a!r} ({phase[a]}); order the "
                               "forward nodes before the backward nodes")

    size = {n: int(dag.nodes[n]["size_bytes"]) for n in order}
    forward = [n for n in order if phase[n] == "forward"]
    backward = [n for n in order if phase[n] == "backward"]
    inputs = [n for n in order if phase[n] == "input"]

    # Timeline: forward steps, then per backward segment run a restore point and its steps.
    position: dict[str, int] = {}
    restore_of_run: list[int] = []
    run_of: dict[str, int] = {}
    t = 0
    for n in forward:
        position[n] = t
        t += 1
    previous_segment = object()
    for n in backward:
        segment = dag.nodes[n].get("segment", n)
        if segment != previous_segment:
            restore_of_run.append(t)
            t += 1
            previous_segment = segment
        run_of[n] = len(restore_of_run) - 1
        position[n] = t
        t += 1
    end = t

    def fwd_users(v):
        return [u for u in dag.successors(v) if phase[u] == "forward"]

    def bwd_users(v):
        return [u for u in dag.successors(v) if phase[u] == "backward"]

    # Restore position of the segment where each forward tensor is first needed.
    group: dict[str, int] = {}
    for v in reversed(forward):
        direct = [restore_of_run[run_of[u]] for u in bwd_users(v)]
        if direct:
            group[v] = min(direct)
        else:
            via = [group[u] for u in fwd_users(v) if u in group]
            if via:
                group[v] = min(via)
    saved = {v for v in forward if bwd_users(v)}
    decidable = [v for v in forward if v in group]

    last_forward = {v: max([position[u] for u in fwd_users(v)] + [position[v]]) for v in forward}
    last_use, backward_last_use, recomputing_readers = {}, {}, {}
    for v in decidable:
        readers = [u for u in fwd_users(v) if u in group]
        backward_last_use[v] = max((position[u] for u in bwd_users(v)), default=-1)
        last_use[v] = max([backward_last_use[v]] + [group[u] for u in readers])
        recomputing_readers[v] = sorted(readers, key=group.__getitem__)
    reader_groups = {v: [group[u] for u in readers] for v, readers in recomputing_readers.items()}

    # A tensor the backward reads is held (kept or brought back) until its last backward
    # use, and after that only while a recomputed reader still needs it. A tensor only
    # recomputations read is held over its whole span when decided: deciding one for no
    # recomputation gains nothing, so that bound is tight at the optimum.
    held_until = {v: backward_last_use[v] if v in saved else last_use[v] for v in decidable}
    stretched = [v for v in decidable if held_until[v] < last_use[v]]
    terms: dict[tuple[str, int], HeldForRecomputation] = {}  # one per distinct term, shared

    def for_recomputation(t: int) -> list[HeldForRecomputation]:
        """The tensors held at `t` only if a reader of theirs is recomputed."""
        out = []
        for v in stretched:
            if held_until[v] < t <= last_use[v]:
                first = bisect.bisect_left(reader_groups[v], t)
                if (v, first) not in terms:
                    terms[v, first] = HeldForRecomputation(v, tuple(recomputing_readers[v][first:]))
                out.append(terms[v, first])
        return out

    # Fixed bytes: inputs always; forward tensors during their forward lifetime; backward tensors.
    input_bytes = sum(size[n] for n in inputs)
    delta = [0] * (end + 2)
    for v in forward:
        last = end if dag.nodes[v].get("output", False) else last_forward[v]
        delta[position[v]] += size[v]
        delta[last + 1] -= size[v]
    for v in backward:
        users = [position[u] for u in dag.successors(v)]
        last = end if dag.nodes[v].get("output", False) else max(users + [position[v]])
        delta[position[v]] += size[v]
        delta[last + 1] -= size[v]
    fixed, running = [], input_bytes
    for step in range(end):
        running += delta[step]
        fixed.append(running)

    # A transient is needed only to recompute other tensors of its own segment: it lives
    # inside that segment's restore phase and is modelled step by step there.
    transient = {v for v in decidable if v not in saved and last_use[v] == group[v]}
    # When a recomputed tensor is held for the backward: from its segment's restore, or
    # (just in time) from its first backward use; in restore phases the latter are transient.
    just_in_time = {v for v in decidable if dag.nodes[v].get("just_in_time", False) and bwd_users(v)}
    materialized_from = {v: min(position[u] for u in bwd_users(v)) if v in just_in_time else group[v]
                         for v in decidable}

    # Checkpoints: one per interval over which the set of decision terms does not change;
    # within an interval only the largest fixed part matters.
    kept_from = {v: last_forward[v] + 1 for v in decidable}
    events = sorted({kept_from[v] for v in decidable} | {last_use[v] + 1 for v in decidable}
                    | {held_until[v] + 1 for v in decidable} | {group[v] + 1 for v in decidable}
                    | {materialized_from[v] for v in decidable} | {0, len(forward)} | set(restore_of_run))
    events = [e for e in events if e < end]
    kept_at, kept_grows, kept_shrinks = _members_by_event(events, list(decidable), kept_from, held_until)
    materialized_at, materialized_grows, materialized_shrinks = _members_by_event(
        events, [v for v in decidable if v not in transient], materialized_from, held_until)
    intervals = []
    for i, start in enumerate(events):
        stop = events[i + 1] if i + 1 < len(events) else end
        peak = max(range(start, stop), key=fixed.__getitem__)
        intervals.append(Checkpoint(peak, fixed[peak], kept_at[i], materialized_at[i], for_recomputation(start)))
    grows = [a and b for a, b in zip(kept_grows, materialized_grows)]
    shrinks = [a and b for a, b in zip(kept_shrinks, materialized_shrinks)]
    checkpoints = _drop_dominated(intervals, grows, shrinks) + _restore_phases(
        decidable, group, held_until, kept_from, transient | just_in_time, materialized_from, fwd_users, fixed,
        for_recomputation)
    needs = {v: [w for w in dag.predecessors(v) if w in group] for v in decidable}
    offloadable = {v: bool(dag.nodes[v].get("offloadable", True)) and size[v] > 0 for v in decidable}
    compute_s = {v: float(dag.nodes[v]["compute_s"]) for v in decidable}
    return SchedulingProblem(
        size={v: size[v] for v in decidable},
        compute_s=compute_s,
        offloadable=offloadable,
        saved=saved & set(decidable),
        needs=needs,
        group=group,
        last_use=last_use,
        position=position,
        checkpoints=checkpoints,
        base_compute_s=sum(float(dag.nodes[n]["compute_s"]) for n in forward + backward),
        equal_blocks=_equal_blocks(dag, decidable, size, compute_s, offloadable, saved, just_in_time, needs),
    )


def _equal_blocks(dag: nx.DiGraph, decidable: list[str], size, compute_s, offloadable, saved, just_in_time,
                  needs) -> list[list[list[str]]]:
    """The classes of two or more equal blocks, each block as its decidable tensors in forward order.

    A block's key lists, in forward order, each decidable tensor's size, cost, whether it
    may be offloaded, is read by the backward or rebuilt just in time, and what it reads:
    a tensor of its own block by index, of another block by relative block and index.
    Reads outside every block (embeddings, masks, rotary tables) are not told apart, so
    sliding-window and global attention layers can be equal. Blocks with equal keys are
    equal. Tying is a restriction on the decisions, never on what the model checks, so a
    loose key can cost optimality but not correctness.
    """
    members: dict[int, list[str]] = defaultdict(list)
    for v in decidable:
        block = dag.nodes[v].get("block")
        if block is not None:
            members[block].append(v)
    where = {v: (b, i) for b, vs in members.items() for i, v in enumerate(vs)}

    def read(w: str, block: int):
        if w not in where:
            return "outside"
        b, i = where[w]
        return ("own", i) if b == block else ("block", b - block, i)

    classes: dict[tuple, list[list[str]]] = defaultdict(list)
    for block, vs in members.items():
        key = tuple((size[v], compute_s[v], offloadable[v], v in saved, v in just_in_time,
                     tuple(read(w, block) for w in needs[v])) for v in vs)
        classes[key].append(vs)
    return [blocks for blocks in classes.values() if len(blocks) > 1]


def _restore_phases(decidable, group, held_until, kept_from, transient, materialized_from, fwd_users,
                    fixed, for_recomputation) -> list[Checkpoint]:
    """Checkpoints inside each segment's restore phase, recomputing in forward order.

    At the i-th recomputation of a segment, what is held is: everything kept, what earlier
    segments brought back and still need, this segment's non-transient tensors up to i,
    and its transients up to i whose last consumer in the segment comes at or after i.
    Only the last sub-step before a transient dies (or the last one) can be a peak.
    """
    members: dict[int, list[str]] = defaultdict(list)
    for v in decidable:  # forward order
        members[group[v]].append(v)
    out = []
    for restore, vs in members.items():
        index = {v: i for i, v in enumerate(vs)}
        last_consumer = {v: max([index[u] for u in fwd_users(v) if u in index] + [index[v]]) for v in transient
                         if v in index}
        kept = [v for v in decidable if kept_from[v] <= restore <= held_until[v]]
        earlier = [v for v in decidable if materialized_from[v] < restore <= held_until[v]
                   and (v not in transient or materialized_from[v] != group[v])]
        held = for_recomputation(restore)
        dies_after = {last_consumer[v] for v in last_consumer}
        for i, v in enumerate(vs):
            if i not in dies_after and i != len(vs) - 1:
                continue
            here = [u for u in vs[: i + 1] if u not in transient or last_consumer[u] >= i]
            out.append(Checkpoint(restore, fixed[restore], kept, earlier + here, held))
    return out


def _members_by_event(events: list[int], tensors: list[str], first: dict[str, int],
                      last: dict[str, int]) -> tuple[list[list[str]], list[bool], list[bool]]:
    """For each event position, the tensors (in the given order) with first[v] <= position <= last[v]:
    each tensor's run of events is bisected once, and each event takes the tensors whose run covers it.

    Also, for each event i but the last, whether its tensors are among event i + 1's
    (`grows[i]`: no run ends at i) and whether event i + 1's are among its own (`shrinks[i]`:
    no run starts at i + 1), read off the runs instead of comparing the member sets.
    """
    at = np.asarray(events)
    lo = np.searchsorted(at, np.array([first[v] for v in tensors], dtype=np.int64), side="left")
    hi = np.searchsorted(at, np.array([last[v] for v in tensors], dtype=np.int64), side="right")
    names = np.array(tensors, dtype=object)
    members = [names[(lo <= i) & (i < hi)].tolist() for i in range(len(events))]
    runs = lo < hi
    ends = np.bincount(hi[runs] - 1, minlength=len(events))  # runs whose last event is i
    starts = np.bincount(lo[runs], minlength=len(events) + 1)  # runs whose first event is i
    return members, (ends[:-1] == 0).tolist(), (starts[1:len(events)] == 0).tolist()


def _drop_dominated(intervals: list[Checkpoint], grows: list[bool], shrinks: list[bool]) -> list[Checkpoint]:
    """Drop checkpoints implied by another: fewer (or equal) terms and no more fixed bytes.

    Consecutive intervals mostly only gain terms (the forward keeps more and more) or only
    lose them (the backward frees); inside such a run a checkpoint is implied by any
    later (gaining) or earlier (losing) one whose fixed part is at least as large.
    `grows[i]` (`shrinks[i]`) says whether interval i's kept and materialized terms are
    among interval i + 1's (interval i + 1's among interval i's), as `_members_by_event` finds.
    """
    held = [set(c.for_recomputation) for c in intervals]

    def within(j: int, gaining: bool) -> bool:
        """Whether interval j's terms are among j + 1's (gaining), or j + 1's among j's."""
        if gaining:
            return grows[j] and held[j] <= held[j + 1]
        return shrinks[j] and held[j + 1] <= held[j]

    keep = [True] * len(intervals)
    i = 0
    while i < len(intervals) - 1:
        j = i
        gaining = within(j, True)
        while j + 1 < len(intervals) and within(j, gaining):
            j += 1
        run = range(i, j + 1)
        best = -1
        for k in (reversed(run) if gaining else run):
            if intervals[k].fixed_bytes <= best:
                keep[k] = False
            best = max(best, intervals[k].fixed_bytes)
        i = j + 1 if j > i else i + 1
    return [c for c, k in zip(intervals, keep) if k]
