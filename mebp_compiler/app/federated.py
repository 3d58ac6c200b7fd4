"""Federated LoRA fine-tuning on Flower: every client compiles its own plan under its own memory budget.

A Flower app (Message API, Flower >= 1.42): the `ServerApp` runs Flower's `FedAvg`
strategy over the LoRA parameters; each `ClientApp` holds its own token blocks and its own
device budget, compiles its training step with `mebp_compiler.compile(policy="optimal",
budget=...)` (so a small phone and a large one get different schedules), trains a few local
steps with that plan and replies with its LoRA parameters only. Flower aggregates them
(`FedAvg.aggregate_train`, weighted by each client's "num-examples"); nothing of the
aggregation is written here.

Faults, by Flower's own handling: a client whose process dies mid-round, or that replies
with an error, is left out of that round's aggregate and the run goes on. A client whose
budget cannot fit the step replies with an error naming the least budget (`BudgetInfeasible`)
in every round it is sampled, and is never aggregated.

`run_federation` runs the app in Flower's simulation runtime (`flwr.simulation.run_simulation`,
virtual clients as Ray actors) on this machine and returns what the server saw, round by
round. Needs the optional extra `federated` (`pip install -e '.[federated]'`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Both are on by default and would reach the network; the project runs offline.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The clients run on CPU; this keeps Ray from warning about a GPU setting that does not apply.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from mebp_compiler.app import data, models
from mebp_compiler.faults import fault_point
from mebp_compiler.passes.scheduler.solver import DEFAULT_WORK_LIMIT, BudgetInfeasible, ScheduleNotFound
from mebp_compiler.plan import Plan, compile, lora_parameters
from mebp_compiler.schedule import Decision
from mebp_compiler.app.train import train
from mebp_compiler.plan import make_optimizer

#: `Error.code` of a client that refuses to train because no schedule fits its budget.
BUDGET_INFEASIBLE = 1001


@dataclass(frozen=True)
class ModelSettings:
    """What every client and the server build identically: the base model, LoRA and the step's shape.

    The base weights must be the same everywhere: `models.load(model, seed=seed)` (real
    weights for "smollm2-135m", seeded random weights for the others).
    """

    model: str = "tiny-llama"
    seed: int = 0
    lora_r: int = 4
    lora_alpha: int = 8
    target_modules: tuple[str, ...] | str = models.LoraSettings.target_modules  # peft's; see `models.LoraSettings`
    layers_to_transform: tuple[int, ...] | None = None
    modules_to_save: tuple[str, ...] = ()
    seq_len: int = 32
    batch_size: int = 1
    device: str = "iphone15promax"  # the cost model the scheduler minimises time on
    work_limit: float = DEFAULT_WORK_LIMIT
    int4: bool = False  # frozen weights as memory-mapped INT4 (not held), as on a phone; see `compile`

    def lora(self) -> models.LoraSettings:
        """Where LoRA goes and what else trains in full, as every client and the server place it."""
        return models.LoraSettings(r=self.lora_r, alpha=self.lora_alpha, target_modules=self.target_modules,
                                   layers_to_transform=self.layers_to_transform, modules_to_save=self.modules_to_save)


@dataclass(frozen=True)
class ClientSpec:
    """One virtual client: its own training token blocks `[n, seq_len]` and its step-memory budget in bytes.

    The budget covers the whole step (weights, LoRA, batch, computed tensors) plus the
    optimizer state over the LoRA parameters, as `compile(policy="optimal")` plans it.
    """

    blocks: torch.Tensor
    budget_bytes: int


@dataclass(frozen=True)
class TrainConfig:
    """What the server asks of every client each round (sent as Flower's ConfigRecord)."""

    local_steps: int = 2
    lr: float = 2e-3
    optimizer: str = "adamw"

    def record(self) -> ConfigRecord:
        return ConfigRecord({"local-steps": self.local_steps, "lr": self.lr, "optimizer": self.optimizer})


@dataclass
class ClientReply:
    """One client's answer in one round: the LoRA parameters it sent and its metrics.

    Metrics (bytes, seconds): "client" (partition id), "num-examples" (its training
    blocks, FedAvg's weight), "loss" (mean over its local steps), "held-peak-bytes" (the
    most bytes its runtime held in a step, plus the optimizer state), "predicted-peak-bytes"
    (its plan's prediction, likewise), "budget-bytes", "compute-s" (its local steps' time),
    "recomputed-tensors" and "offloaded-tensors" (its schedule).
    """

    node_id: int
    arrays: dict[str, torch.Tensor]
    metrics: dict[str, float | int]

    @property
    def sent_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.arrays.values())


@dataclass
class RoundRecord:
    """What the server received in one round and what FedAvg made of it."""

    round: int
    replies: list[ClientReply] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)  # node id -> Flower's error reason
    aggregate: dict[str, torch.Tensor] = field(default_factory=dict)
    heldout_loss: float | None = None
    broadcast_bytes: int = 0  # the global LoRA parameters sent to the sampled clients

    @property
    def uplink_bytes(self) -> int:
        return sum(r.sent_bytes for r in self.replies)

    def to_json(self) -> dict:
        """The round without the tensors: clients' metrics, failures, held-out loss, bytes each way."""
        return {"round": self.round, "heldout_loss": self.heldout_loss, "uplink_bytes": self.uplink_bytes,
                "broadcast_bytes": self.broadcast_bytes, "clients": [r.metrics for r in self.replies],
                "failures": {str(node): reason for node, reason in self.failures.items()}}


@dataclass
class FederationResult:
    """The run as the server saw it: round 0 is the starting point (its held-out loss only)."""

    rounds: list[RoundRecord]
    final: dict[str, torch.Tensor]


class RecordingFedAvg(FedAvg):
    """Flower's FedAvg, unchanged, that also keeps every round's replies for the record.

    `aggregate_train` is FedAvg's own; this only reads the replies before passing them on.
    """

    def __init__(self, **fedavg) -> None:
        super().__init__(**fedavg)
        self.rounds: list[RoundRecord] = []

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds.append(RoundRecord(round=server_round,
                                       broadcast_bytes=len(messages) * _array_bytes(arrays)))
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        record = self.rounds[-1]
        for reply in replies:
            if reply.has_error():
                record.failures[reply.metadata.src_node_id] = reply.error.reason or f"error {reply.error.code}"
            else:
                record.replies.append(ClientReply(
                    node_id=reply.metadata.src_node_id,
                    arrays=dict(reply.content[self.arrayrecord_key].to_torch_state_dict()),
                    metrics=dict(reply.content["metrics"])))
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            record.aggregate = dict(arrays.to_torch_state_dict())
        return arrays, metrics


def _array_bytes(arrays: ArrayRecord) -> int:
    """The tensors' own bytes (what `ClientReply.sent_bytes` counts), without Flower's serialization headers."""
    return sum(array.numpy().nbytes for array in arrays.values())


@functools.cache
def _model_and_start(settings: ModelSettings) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The process's one copy of the LoRA model, and a copy of its LoRA parameters as peft initialised them."""
    model = models.load(settings.model, seed=settings.seed)
    torch.manual_seed(settings.seed)  # peft draws LoRA's A from the global RNG; real weights do not reseed it
    model = models.add_lora(model, settings.lora())
    return model, {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _lora_model(settings: ModelSettings) -> torch.nn.Module:
    """The process's one copy of the LoRA model; every plan of this process steps its parameters."""
    return _model_and_start(settings)[0]


@functools.cache
def _plan(settings: ModelSettings, budget_bytes: int, optimizer: str) -> Plan | Exception:
    """The client's compiled step under its budget, or the BudgetInfeasible / ScheduleNotFound that refused it.

    Compiled once per process and budget (a Ray actor serves many rounds); the plan reads
    the model's parameters at every step, so loading the round's global LoRA values into
    the model is all a new round needs.
    """
    model = _lora_model(settings)
    ids = torch.zeros((settings.batch_size, settings.seq_len), dtype=torch.int64)
    try:
        # Two tensors, as a training batch has: one tensor under both keys would be one step input.
        return compile(model, {"input_ids": ids, "labels": ids.clone()}, "optimal", budget=budget_bytes,
                       device=settings.device, optimizer=optimizer, work_limit=settings.work_limit,
                       int4=settings.int4)
    except (BudgetInfeasible, ScheduleNotFound) as exc:
        return exc


def load_lora(settings: ModelSettings, lora: dict[str, torch.Tensor]) -> torch.nn.Module:
    """This process's LoRA model with the LoRA parameters set to `lora` (e.g. a federation's final aggregate)."""
    model = _lora_model(settings)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in lora.items():
            params[name].copy_(value)
    return model


def initial_lora(settings: ModelSettings) -> dict[str, torch.Tensor]:
    """The starting global LoRA parameters: peft's init of this process's model (whatever it holds now), by name."""
    return {name: value.clone() for name, value in _model_and_start(settings)[1].items()}


def client_app(settings: ModelSettings, clients: Sequence[ClientSpec], threads: int = 1) -> ClientApp:
    """The ClientApp: client `partition-id` (Flower's node config) trains on `clients[partition-id]`.

    Each round it compiles (once) its plan under its own budget, loads the global LoRA
    parameters, trains `local-steps` steps with a fresh optimizer, and replies with its LoRA
    parameters and `ClientReply`'s metrics. If no schedule fits its budget it replies with
    an Error (code `BUDGET_INFEASIBLE`) that names the least budget, and trains nothing.
    The fault point `federate-client-<id>-round-<n>` (`mebp_compiler.faults`) lies between
    its local steps and its reply.
    """
    app = ClientApp()

    @app.train()
    def train_round(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        partition = int(context.node_config["partition-id"])
        spec = clients[partition]
        config = msg.content["config"]
        server_round = int(config["server-round"])
        optimizer_name = str(config["optimizer"])
        plan = _plan(settings, spec.budget_bytes, optimizer_name)
        if isinstance(plan, Exception):
            return Message(Error(code=BUDGET_INFEASIBLE, reason=f"client {partition} refuses to train: {plan}"),
                           reply_to=msg)
        lora = lora_parameters(plan.model, plan.graph)
        incoming = msg.content["arrays"].to_torch_state_dict()
        with torch.no_grad():
            for name, param in lora.items():
                param.copy_(incoming[name])
        steps = int(config["local-steps"])
        optimizer = make_optimizer(lora.values(), optimizer_name, float(config["lr"]))
        batches = data.batches(spec.blocks, settings.batch_size, seed=settings.seed + 1000 * server_round + partition)
        history = train(plan, batches, steps, optimizer, progress=False)
        fault_point(f"federate-client-{partition}-round-{server_round}")
        state = plan.optimizer_state_bytes
        metrics = MetricRecord({
            "client": partition,
            "num-examples": int(spec.blocks.shape[0]),
            "loss": sum(history.loss) / len(history.loss),
            "held-peak-bytes": max(history.held_peak_bytes) + state,
            "predicted-peak-bytes": plan.predicted_peak_bytes + state,
            "budget-bytes": spec.budget_bytes,
            "compute-s": sum(history.step_s),
            "recomputed-tensors": len(plan.schedule.tensors_with(Decision.RECOMPUTE)),
            "offloaded-tensors": len(plan.schedule.tensors_with(Decision.OFFLOAD)),
        })
        arrays = ArrayRecord({name: p.detach().clone() for name, p in lora.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def heldout_loss(settings: ModelSettings, lora: dict[str, torch.Tensor], blocks: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats/token) of the model with these LoRA values on `blocks`."""
    model = load_lora(settings, lora)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks.shape[0], settings.batch_size):
            ids = blocks[start:start + settings.batch_size]
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(model(input_ids=ids, labels=ids).loss) * n
            tokens += n
    return total / tokens


def server_app(settings: ModelSettings, num_clients: int, rounds: int, config: TrainConfig,
               heldout: torch.Tensor | None, records: list[RoundRecord],
               on_round: Callable[[RoundRecord], None] | None = None) -> ServerApp:
    """The ServerApp: Flower's FedAvg over the LoRA parameters of all `num_clients` clients, `rounds` rounds.

    Every client is sampled every round. After each round the server computes the held-out
    loss of the aggregate on `heldout` (when given) through FedAvg's `evaluate_fn` hook,
    appends the round's `RoundRecord` to `records`, and calls `on_round` with it.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = RecordingFedAvg(fraction_evaluate=0.0, min_train_nodes=num_clients,
                                   min_available_nodes=num_clients)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            record = strategy.rounds[-1] if server_round else RoundRecord(round=0)
            if server_round == 0:
                record.aggregate = dict(arrays.to_torch_state_dict())
            if heldout is not None:
                record.heldout_loss = heldout_loss(settings, dict(arrays.to_torch_state_dict()), heldout)
            records.append(record)
            if on_round is not None:
                on_round(record)
            return None if record.heldout_loss is None else MetricRecord({"heldout-loss": record.heldout_loss})

        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_lora(settings)), num_rounds=rounds,
                       train_config=config.record(), evaluate_fn=evaluate)

    return app


def run_federation(settings: ModelSettings, clients: Sequence[ClientSpec], rounds: int,
                   config: TrainConfig = TrainConfig(), *, heldout: torch.Tensor | None = None,
                   parallel: int = 2, on_round: Callable[[RoundRecord], None] | None = None,
                   verbose: bool = False) -> FederationResult:
    """Run the app in Flower's simulation runtime: `len(clients)` virtual clients, at most `parallel` at once.

    Ray gets `parallel` CPUs and each client one (so `parallel` actor processes, each
    compiling a client's plan once). `verbose` keeps Flower's INFO log on; otherwise only
    its warnings and errors show. Returns round 0 (the start) and every round as the
    server saw it; `final` is the last aggregate (the start, if no round aggregated).
    """
    import logging

    from flwr.simulation import run_simulation

    if rounds < 1 or not clients:
        raise ValueError(f"a federation needs at least one round and one client, got {rounds} and {len(clients)}")
    records: list[RoundRecord] = []
    server = server_app(settings, len(clients), rounds, config, heldout, records, on_round)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        run_simulation(server_app=server, client_app=client_app(settings, clients), num_supernodes=len(clients),
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": parallel, "num_gpus": 0,
                                                     "include_dashboard": False, "log_to_driver": verbose}})
    finally:
        flwr_logger.setLevel(level)
    final = next((r.aggregate for r in reversed(records) if r.aggregate), {})
    return FederationResult(rounds=records, final=final)


def shard_clients(tokenizer: Callable, texts: Sequence[str], budgets: Sequence[int], seq_len: int,
                  heldout_fraction: float = 0.1, seed: int = 0) -> tuple[list[ClientSpec], torch.Tensor]:
    """One client per text: its blocks of `seq_len` tokens less a held-out part, and its budget.

    Each shard holds out `heldout_fraction` of its blocks (`data.split_blocks`); the
    returned held-out blocks are all of those together, for the server's evaluation.
    """
    if len(texts) != len(budgets):
        raise ValueError(f"{len(texts)} text shards but {len(budgets)} budgets: give one budget per client")
    clients, heldout = [], []
    for text, budget in zip(texts, budgets):
        train_blocks, heldout_blocks = data.split_blocks(data.token_blocks(tokenizer, text, seq_len),
                                                         heldout_fraction, seed)
        clients.append(ClientSpec(train_blocks, budget))
        heldout.append(heldout_blocks)
    return clients, torch.cat(heldout)


def topic_shards(num_clients: int) -> list[str]:
    """CPython's pydoc topics split by topic into `num_clients` contiguous groups of sorted topic names.

    Non-IID by construction: each client sees other subjects (keywords, operators, types ...).
    Groups are cut where the running text length crosses each 1/num_clients of the total.
    """
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if not 1 <= num_clients <= len(keys):
        raise ValueError(f"num_clients must be between 1 and the {len(keys)} topics, got {num_clients}")
    total = sum(len(topics[k]) for k in keys)
    shards: list[list[str]] = [[] for _ in range(num_clients)]
    done = 0
    for k in keys:
        shards[min(num_clients - 1, math.floor(done * num_clients / total))].append(topics[k])
        done += len(topics[k])
    return ["\n\n".join(texts) for texts in shards]

