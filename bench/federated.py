"""Federated study: SmolLM2-135M (real weights) on non-IID pydoc shards, four phones' budgets, Flower's FedAvg.

Four virtual clients each hold the pydoc topics of one alphabetical quarter (non-IID by
subject) and a step-memory budget from phone-small to phone-large; each compiles its own
plan under it (INT4 frozen weights memory-mapped, as on a phone) and trains `--local-steps`
AdamW steps per round in Flower's simulation runtime. Reported, side by side in one run:

- held-out loss of the aggregate (every client's held-out blocks) after each round, against
  rounds and against the clients' total compute time so far;
- each client's held peak against its budget, per round;
- bytes sent per round, clients to server (LoRA only) and server to clients;
- the reference: the same total number of steps trained centrally on all clients' training
  blocks, one plan (the largest budget), evaluated at the same step counts.

Held-out loss is computed by the same float32 model for both (the server's evaluation);
the clients and the central run train on its INT4-dequantized weights.

    python bench/federated.py --rounds 4 --local-steps 3 --seq-len 64 --out docs/federated
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mebp_compiler.app import data, federated, models
from mebp_compiler.device import parse_size
from mebp_compiler.files import atomic_write, atomic_write_json, atomic_write_text
from mebp_compiler.ir import format_bytes
from mebp_compiler.plan import compile
from mebp_compiler.app.train import train
from mebp_compiler.plan import make_optimizer

BUDGETS = ("64MB", "256MB", "512MB", "1GB")


def central_reference(settings: federated.ModelSettings, clients, heldout: torch.Tensor, start: dict,
                      rounds: int, steps_per_round: int, config: federated.TrainConfig, budget: int) -> list[dict]:
    """All clients' blocks on one device from the federation's `start`: `steps_per_round` steps per 'round'."""
    model = models.add_lora(models.load(settings.model, seed=settings.seed),
                            models.LoraSettings(r=settings.lora_r, alpha=settings.lora_alpha))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in start.items():
            params[name].copy_(value)
    ids = torch.zeros((settings.batch_size, settings.seq_len), dtype=torch.int64)
    plan = compile(model, {"input_ids": ids, "labels": ids}, "optimal", budget=budget, device=settings.device,
                   work_limit=settings.work_limit, int4=settings.int4)
    lora = plan.lora_parameters()
    optimizer = make_optimizer(lora.values(), config.optimizer, config.lr)
    batches = data.batches(torch.cat([c.blocks for c in clients]), settings.batch_size, seed=settings.seed)
    curve, compute_s = [], 0.0
    for r in range(rounds + 1):
        if r:
            history = train(plan, batches, steps_per_round, optimizer, progress=False)
            compute_s += sum(history.step_s)
        loss = federated.heldout_loss(settings, {n: p.detach() for n, p in lora.items()}, heldout)
        curve.append({"round": r, "steps": r * steps_per_round, "heldout_loss": loss, "compute_s": compute_s})
        print(f"[central] after {r * steps_per_round} steps: held-out loss {loss:.4f}", file=sys.stderr, flush=True)
    return curve


def table(study: dict) -> str:
    rows = ["| round | steps (all clients) | federated held-out loss | central held-out loss | client compute (s, total) "
            "| central compute (s) | sent up | sent down |",
            "|---|---|---|---|---|---|---|---|"]
    for fed, cen in zip(study["federated"], study["central"]):
        rows.append(f"| {fed['round']} | {cen['steps']} | {fed['heldout_loss']:.4f} | {cen['heldout_loss']:.4f} | "
                    f"{fed['compute_s']:.1f} | {cen['compute_s']:.1f} | {format_bytes(fed['uplink_bytes'])} | "
                    f"{format_bytes(fed['broadcast_bytes'])} |")
    rows += ["", "| client | budget | training blocks | held peak (max over rounds) | predicted peak | recomputed "
             "tensors | offloaded tensors | status |", "|---|---|---|---|---|---|---|---|"]
    for k, client in enumerate(study["clients"]):
        replies = [c for r in study["federated"] for c in r["clients"] if c["client"] == k]
        if replies:
            last = replies[-1]
            rows.append(f"| {k} | {format_bytes(client['budget_bytes'])} | {client['blocks']} | "
                        f"{format_bytes(max(c['held-peak-bytes'] for c in replies))} | "
                        f"{format_bytes(last['predicted-peak-bytes'])} | {last['recomputed-tensors']} | "
                        f"{last['offloaded-tensors']} | trained {len(replies)} rounds |")
        else:
            rows.append(f"| {k} | {format_bytes(client['budget_bytes'])} | {client['blocks']} | - | - | - | - | "
                        f"refused: {client['refusal']} |")
    return "\n".join(rows) + "\n"


def figure(study: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fed, cen = study["federated"], study["central"]
    fig, (by_round, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    by_round.plot([r["round"] for r in fed], [r["heldout_loss"] for r in fed], "o-", label="federated (FedAvg)")
    by_round.plot([r["round"] for r in cen], [r["heldout_loss"] for r in cen], "s--",
                  label="central, same total steps")
    by_round.set_xlabel("round (central: the same number of steps)")
    by_time.plot([r["compute_s"] for r in fed], [r["heldout_loss"] for r in fed], "o-", label="federated: all clients")
    by_time.plot([r["compute_s"] for r in cen], [r["heldout_loss"] for r in cen], "s--", label="central")
    by_time.set_xlabel("training compute so far (s, summed over clients)")
    for ax in (by_round, by_time):
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M, LoRA r={study['settings']['lora_r']}, {len(study['clients'])} clients, "
                 f"seq {study['settings']['seq_len']}")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--heldout-blocks", type=int, default=4, help="held-out sequences per client")
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default="docs/federated")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    settings = federated.ModelSettings(model="smollm2-135m", lora_r=8, lora_alpha=16, seq_len=args.seq_len,
                                       batch_size=1, int4=True)
    budgets = [parse_size(b) for b in args.budgets.split(",")]
    tokenizer = models.load_tokenizer(settings.model)
    clients, heldout = federated.shard_clients(tokenizer, federated.topic_shards(len(budgets)), budgets,
                                               settings.seq_len)
    per_client = heldout.shape[0] // len(budgets)
    heldout = torch.cat([heldout[k * per_client:k * per_client + args.heldout_blocks] for k in range(len(budgets))])
    config = federated.TrainConfig(local_steps=args.local_steps, lr=args.lr)
    start = time.perf_counter()

    def progress(record: federated.RoundRecord) -> None:
        print(f"[federated] round {record.round}: held-out loss {record.heldout_loss:.4f}, "
              f"{len(record.replies)} replied, {len(record.failures)} failed, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    result = federated.run_federation(settings, clients, args.rounds, config, heldout=heldout,
                                      parallel=args.parallel, on_round=progress)
    federated_s = time.perf_counter() - start
    rounds, compute_s = [], 0.0
    for record in result.rounds:
        compute_s += sum(r.metrics["compute-s"] for r in record.replies)
        rounds.append({**record.to_json(), "compute_s": compute_s})
    refusals = {}
    for record in result.rounds:
        for reason in record.failures.values():
            if reason.startswith("client "):
                refusals[int(reason.split()[1])] = " ".join(reason.split(":", 1)[1].split()[:12]) + " ..."
    trained = {c["client"] for r in rounds for c in r["clients"]}
    steps_per_round = args.local_steps * len(trained)
    study = {
        "settings": {**vars(args), "lora_r": settings.lora_r, "model": settings.model, "int4": settings.int4,
                     "device": settings.device},
        "clients": [{"budget_bytes": c.budget_bytes, "blocks": int(c.blocks.shape[0]), "refusal": refusals.get(k)}
                    for k, c in enumerate(clients)],
        "heldout_blocks": int(heldout.shape[0]),
        "federated": rounds,
        "federated_wall_s": federated_s,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study.json", study)  # the federated half survives a failed reference run
    study["central"] = central_reference(settings, clients, heldout, result.rounds[0].aggregate, args.rounds,
                                         steps_per_round, config, max(budgets))
    atomic_write_json(out / "study.json", study)
    atomic_write_text(out / "table.md", table(study))
    figure(study, out / "loss.png")
    print(table(study))
    for record in rounds:
        for c in record["clients"]:
            assert c["held-peak-bytes"] <= c["budget-bytes"], f"client {c['client']} held more than its budget"
    return 0


if __name__ == "__main__":
    sys.exit(main())
