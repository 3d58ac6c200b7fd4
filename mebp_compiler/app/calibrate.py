"""`mebp calibrate`: measure this machine and write a device profile for the cost model.

What is measured, all in process CPU seconds (`time.process_time`: what this process
computed, not the time other jobs on a shared machine took from it), each the median of
`rounds` repetitions taken in turn. Flash I/O is timed by the wall clock too, for
comparison: a write that waits on the disk without using the CPU would show only there;
on the 2-core development machine the offloaded bytes of a step stay in the page cache,
and the wall clock mostly measured the other jobs (a 4x gap at load average 12).

- op rates per op class (`passes.cost.op_class`): a real-size training step is captured
  and run by the CPU runtime, every op timed where it runs (its real inputs, caches and
  memory); per class, the FLOP/s (matmuls) or bytes moved per second (the other classes)
  that the class's ops reach in total past their per-op overhead;
- the per-op overhead: the median time of the step's view ops (which move no data: the
  op's dispatch), plus the runtime's own work per op (a timed step's time less the sum of
  its ops' times, spread over its ops);
- offload write and read rates: `OffloadStore` writing a tensor to a real file on disk and
  mapping it back (CRC-32 checks included, as a step pays them), and the fixed cost of a
  4 KiB round trip;
- the INT4 decode rate: `dequantize_int4` on a weight of the model's MLP size, past what
  the movement roofline already charges for its bytes.

Flash I/O and compute do not overlap on this runtime: it calls `offload` and `reload`
inside the step, synchronously, so the profile's `io_overlap` is 0.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from mebp_compiler.device import OP_CLASSES, DeviceProfile, OpClassRates
from mebp_compiler.files import atomic_write_json
from mebp_compiler.ir import Phase, TrainingGraph
from mebp_compiler.offload import OffloadStore
from mebp_compiler.passes.cost import bytes_moved, op_class
from mebp_compiler.passes.quantize import dequantize_int4, quantize_int4
from mebp_compiler.runtime import Runtime

#: Called once per unit of measured work (a timed step or one I/O or decode round).
Tick = Callable[[], None]


@dataclass
class ClassTiming:
    """The measured ops of one class in one step: how many, their seconds, FLOPs and bytes."""

    ops: int = 0
    seconds: float = 0.0  # sum of the ops' median process CPU seconds, overheads included
    flops: int = 0
    bytes_moved: int = 0


@dataclass
class Calibration:
    """A measured profile and what it was fitted from."""

    profile: DeviceProfile
    by_class: dict[str, ClassTiming]
    step_s: float  # process CPU seconds of the step: its ops' medians and the runtime's work between them
    offload_bytes: int
    wall_write_bytes_per_s: float  # the same write and read by the wall clock, for comparison
    wall_read_bytes_per_s: float
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The profile as `DeviceProfile.load` reads it, with the measurements behind it."""
        return {**self.profile.to_json(), "description": self.details.get("description", ""), "measured": {
            "step_process_s": self.step_s,
            "by_class": {k: vars(v) for k, v in self.by_class.items()},
            "offload_bytes": self.offload_bytes,
            "wall_write_bytes_per_s": self.wall_write_bytes_per_s,
            "wall_read_bytes_per_s": self.wall_read_bytes_per_s,
            **self.details,
        }}


def time_ops(graph: TrainingGraph, inputs: list[torch.Tensor], rounds: int, tick: Tick = lambda: None,
             runtime: Runtime | None = None) -> tuple[dict[str, float], float]:
    """Median process CPU seconds of every call node of `graph` over `rounds` steps timed op by op
    (after one warm-up step), and the median of those steps' time outside their ops: the
    runtime's own work between ops."""
    runtime = runtime or Runtime(graph)
    runtime.run(inputs)
    names = [n.name for n in runtime.steps]
    per_op: list[list[float]] = [[] for _ in names]
    between = []
    for _ in range(rounds):
        times: list[float] = []
        start = time.process_time()
        runtime.run(inputs, op_times=times)
        between.append(time.process_time() - start - sum(times))
        for k, t in enumerate(times):
            per_op[k].append(t)
        tick()
    return {name: statistics.median(ts) for name, ts in zip(names, per_op, strict=True)}, statistics.median(between)


def timings_by_class(graph: TrainingGraph, op_seconds: dict[str, float]) -> dict[str, ClassTiming]:
    """The measured op seconds of `graph` summed per op class, with the FLOPs and bytes of those ops."""
    nodes = {n.name: n for n in graph.module.graph.nodes}
    by_class: dict[str, ClassTiming] = defaultdict(ClassTiming)
    for name, seconds in op_seconds.items():
        node, ti = nodes[name], graph.info[name]
        if ti.phase == Phase.INPUT:
            continue
        timing = by_class[op_class(node, ti)]
        timing.ops += 1
        timing.seconds += seconds
        timing.flops += ti.flops
        timing.bytes_moved += 0 if ti.is_view else bytes_moved(node, ti)
    return dict(by_class)


def fit_op_classes(graph: TrainingGraph, op_seconds: dict[str, float], between_s: float,
                   ) -> tuple[float, dict[str, OpClassRates]]:
    """Per-op overhead and each class's roofline, from measured op seconds.

    The overhead is an op's dispatch (the median of the view ops) plus the runtime's work
    between ops (`between_s` for the whole step) per op.

    Matmuls get the FLOP/s their ops reach in total past the overhead (and the fastest
    byte rate of the other classes); every other class gets its bytes per second (and the
    matmuls' FLOP/s, which it never reaches).
    """
    nodes = {n.name: n for n in graph.module.graph.nodes}
    views = [s for name, s in op_seconds.items() if op_class(nodes[name], graph.info[name]) == "view"]
    if not views:
        raise ValueError("the calibration step has no view ops to measure the per-op overhead with")
    dispatch = statistics.median(views)
    bookkeeping = max(between_s, 0.0) / len(op_seconds)
    work: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # seconds past overhead, flops, bytes
    for name, seconds in op_seconds.items():
        node, ti = nodes[name], graph.info[name]
        cls = op_class(node, ti)
        if cls == "view" or ti.phase == Phase.INPUT:
            continue
        row = work[cls]
        row[0] += max(seconds - dispatch, 0.0)
        row[1] += ti.flops
        row[2] += bytes_moved(node, ti)
    if "matmul" not in work:
        raise ValueError("the calibration step has no matmuls; calibrate on a model step")
    floor = 1e-9  # a class whose ops all ran within the overhead: its rate is bounded by 1 ns of work
    byte_rates = {c: row[2] / max(row[0], floor) for c, row in work.items() if c != "matmul"}
    flops_per_s = work["matmul"][1] / max(work["matmul"][0], floor)
    fastest_bytes = max(byte_rates.values(), default=work["matmul"][2] / max(work["matmul"][0], floor))
    rates = {"matmul": OpClassRates(flops_per_s, fastest_bytes)}
    rates.update({c: OpClassRates(flops_per_s, b) for c, b in byte_rates.items()})
    return dispatch + bookkeeping, rates


def time_offload(directory: str | os.PathLike, nbytes: int, rounds: int, tick: Tick = lambda: None) -> dict[str, float]:
    """Write and read rates of `OffloadStore` in `directory` (bytes per process CPU second and per
    wall-clock second), and the CPU seconds of a 4 KiB write + read round trip; after one untimed round
    trip, since a run's offload files are reused by every step after its first."""
    store = OffloadStore(directory)
    tensor = torch.randn(nbytes // 4)
    small = torch.randn(1024)
    store.read(store.write(tensor, "calibrate"))  # the files exist from then on, as in every step after a run's first
    store.read(store.write(small, "calibrate-small"))
    write, read, wall_write, wall_read, trip = [], [], [], [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        handle = store.write(tensor, "calibrate")
        write.append(time.process_time() - cpu)
        wall_write.append(time.perf_counter() - wall)
        wall, cpu = time.perf_counter(), time.process_time()
        back = store.read(handle)
        read.append(time.process_time() - cpu)
        wall_read.append(time.perf_counter() - wall)
        del back
        cpu = time.process_time()
        store.read(store.write(small, "calibrate-small"))
        trip.append(time.process_time() - cpu)
        tick()
    size = tensor.numel() * tensor.element_size()
    return {"write": size / statistics.median(write), "read": size / statistics.median(read),
            "wall_write": size / statistics.median(wall_write), "wall_read": size / statistics.median(wall_read),
            "latency": statistics.median(trip)}


def time_decode(rows: int, cols: int, rounds: int, movement: OpClassRates, overhead: float, read_bytes_per_s: float,
                tick: Tick = lambda: None) -> float:
    """INT4 bytes decoded per process CPU second by `dequantize_int4` on a [rows x cols] weight, past the
    per-op overhead, the movement roofline of its bytes and the read of its INT4 bytes (what the
    cost model charges a decompression besides the decode)."""
    packed, scales = quantize_int4(torch.randn(rows, cols))
    dequantize_int4(packed, scales)
    seconds = []
    for _ in range(rounds):
        start = time.process_time()
        dequantize_int4(packed, scales)
        seconds.append(time.process_time() - start)
        tick()
    int4_bytes = rows * cols / 2
    moved = packed.numel() * packed.element_size() + scales.numel() * scales.element_size() + rows * cols * 4
    charged = overhead + moved / movement.bytes_per_s + int4_bytes / read_bytes_per_s
    measured = statistics.median(seconds)
    return int4_bytes / max(measured - charged, 0.1 * measured)  # at least a tenth of the time is the decode


def calibrate(graph: TrainingGraph, inputs: list[torch.Tensor], *, name: str, rounds: int = 5,
              offload_dir: str | os.PathLike | None = None, offload_bytes: int = 64 * 2**20,
              decode_shape: tuple[int, int] = (1536, 576), tick: Tick = lambda: None,
              description: str = "") -> Calibration:
    """Measure this machine on the captured step `graph` (run on `inputs`) and fit a device profile.

    `offload_dir` is where offloaded tensors are written (default: a temporary directory
    in the current one, so on the disk a run would use, not a RAM-backed /tmp).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    op_seconds, between_s = time_ops(graph, inputs, rounds, tick)
    overhead, rates = fit_op_classes(graph, op_seconds, between_s)
    step_s = sum(op_seconds.values()) + between_s
    with tempfile.TemporaryDirectory(prefix=".mebp-calibrate-", dir=offload_dir or ".") as directory:
        io = time_offload(directory, offload_bytes, rounds, tick)
    decode = time_decode(*decode_shape, rounds, rates.get("movement", rates["matmul"]), overhead, io["read"], tick)
    profile = DeviceProfile(
        name=name,
        memory_cap_bytes=psutil.virtual_memory().total,
        flops_per_s=rates["matmul"].flops_per_s,
        memory_bytes_per_s=rates.get("elementwise", rates["matmul"]).bytes_per_s,
        flash_read_bytes_per_s=io["read"],
        flash_write_bytes_per_s=io["write"],
        io_overlap=0.0,
        op_overhead_s=overhead,
        io_latency_s=io["latency"],
        decompress_bytes_per_s=decode,
        op_classes={c: rates[c] for c in OP_CLASSES if c in rates},
    )
    details = {"rounds": rounds, "threads": torch.get_num_threads(), "machine": platform.machine(),
               "processor": platform.processor(), "cpus": os.cpu_count(),
               "load_average": list(os.getloadavg()), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "io_overlap": "0: the CPU runtime writes and reads offloaded tensors inside the step, synchronously",
               "description": description or f"measured by mebp calibrate on {platform.node()}"}
    return Calibration(profile, timings_by_class(graph, op_seconds), step_s, offload_bytes,
                       io["wall_write"], io["wall_read"], details)


def write_profile(calibration: Calibration, path: str | os.PathLike) -> Path:
    """Write the calibrated profile atomically as JSON that `DeviceProfile.load(path)` reads."""
    return atomic_write_json(path, calibration.to_json())


def model_step(model_name: str, seq_len: int, batch_size: int = 1, seed: int = 0,
               ) -> tuple[torch.nn.Module, TrainingGraph, list[torch.Tensor]]:
    """A LoRA model (r=16 on the attention projections, peft's defaults here), its captured
    training step at `batch_size` x `seq_len` and the step's inputs (random token ids)."""
    from mebp_compiler.app import models
    from mebp_compiler.capture import capture
    from mebp_compiler.plan import graph_inputs

    model = models.add_lora(models.load(model_name))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone()}
    graph = capture(model, batch)
    return model, graph, graph_inputs(model, graph, batch)


def run_command(args) -> int:
    """`mebp calibrate`: measure, write the profile, print what it holds."""
    from tqdm.auto import tqdm

    from mebp_compiler.progress import phase

    with phase(f"capturing a {args.model} step at seq {args.seq_len}"):
        _, graph, inputs = model_step(args.model, args.seq_len, args.batch_size)
    bar = tqdm(total=3 * args.rounds, desc="calibrate", unit="round", disable=args.no_progress)
    calibration = calibrate(graph, inputs, name=args.name or Path(args.out).stem, rounds=args.rounds,
                            offload_dir=args.offload_dir or str(Path(args.out).resolve().parent),
                            offload_bytes=args.offload_mib * 2**20, tick=lambda: bar.update(1),
                            description=f"measured by `mebp calibrate --model {args.model} --seq-len {args.seq_len}"
                                        f" --rounds {args.rounds}` on {platform.node()}, {args.threads} torch "
                                        "thread(s), process CPU time")
    bar.close()
    path = write_profile(calibration, args.out)
    print(describe(calibration))
    print(f"wrote {path}; use it with --device {path}")
    return 0


def describe(calibration: Calibration) -> str:
    """The calibrated rates, one line each."""
    p = calibration.profile
    lines = [f"step: {calibration.step_s:.3f} s of process CPU time (op medians of {calibration.details['rounds']})",
             f"per-op overhead: {p.op_overhead_s * 1e6:.1f} us"]
    for cls, rates in p.op_classes.items():
        t = calibration.by_class.get(cls, ClassTiming())
        rate = f"{rates.flops_per_s / 1e9:.1f} GFLOP/s" if cls == "matmul" else f"{rates.bytes_per_s / 1e9:.2f} GB/s"
        lines.append(f"{cls}: {rate} ({t.ops} ops, {t.seconds:.3f} s)")
    lines += [f"offload write {p.flash_write_bytes_per_s / 1e9:.2f} GB/s, read {p.flash_read_bytes_per_s / 1e9:.2f} "
              f"GB/s (by the wall clock: {calibration.wall_write_bytes_per_s / 1e9:.2f} and "
              f"{calibration.wall_read_bytes_per_s / 1e9:.2f}), 4 KiB round trip {p.io_latency_s * 1e6:.0f} us",
              f"INT4 decode {p.decompress_bytes_per_s / 1e9:.2f} GB/s of INT4 bytes"]
    return "\n".join(lines)
