"""The Flower app in Flower's simulation runtime: FedAvg of what the clients sent, budgets held, faults survived.

One simulation (Ray actors, one per client) of tiny-llama, 2 rounds, four clients: two that
fit different budgets, one whose budget fits no schedule, and one killed (SIGKILL, by
`MEBP_FAULT_AT`) after its local steps in round 2, before its reply.
"""

from __future__ import annotations

import torch

from mebp_compiler.app import data, federated, models
from mebp_compiler.plan import make_optimizer
from tests.conftest import FLOAT32_UNIT_ROUNDOFF

SETTINGS = federated.ModelSettings(model="tiny-llama", lora_r=4, lora_alpha=8, seq_len=32, batch_size=1)
# SGD, whose update is linear in the gradient: a client's rounding-level gradient difference
# from eager autograd moves its parameters by lr times that difference. (AdamW divides by
# the root of the second moment, so where a gradient entry is at rounding level it can move
# a parameter by up to lr, and no tolerance on the parameters would follow.) lr = 2^-8 makes
# lr x gradient exact.
CONFIG = federated.TrainConfig(local_steps=2, lr=2.0**-8, optimizer="sgd")
# tiny-llama at seq 32 (SGD: no optimizer state): 800,068 bytes keep every activation, 602,052 is the least.
KEEP_ALL, TIGHT, INFEASIBLE = 900_000, 700_000, 550_000
KILLED = 3


def client_specs() -> list[federated.ClientSpec]:
    texts = federated.topic_shards(4)
    blocks = [data.token_blocks(data.ByteTokenizer(), text, SETTINGS.seq_len) for text in texts]
    sizes = (40, 25, 10, 30)  # unequal, so FedAvg's example weighting matters
    budgets = (KEEP_ALL, TIGHT, INFEASIBLE, KEEP_ALL)
    return [federated.ClientSpec(b[:n], budget) for b, n, budget in zip(blocks, sizes, budgets)]


def fedavg(replies: list[federated.ClientReply], absolute: bool = False) -> dict[str, torch.Tensor]:
    """McMahan et al.'s weighted mean, sum_k n_k w_k / sum_k n_k, in float64 (of |w_k| if `absolute`)."""
    total = sum(r.metrics["num-examples"] for r in replies)
    value = (lambda x: x.double().abs()) if absolute else (lambda x: x.double())
    return {name: sum(value(r.arrays[name]) * r.metrics["num-examples"] for r in replies) / total
            for name in replies[0].arrays}


def autograd_local_training(start: dict[str, torch.Tensor], spec: federated.ClientSpec, partition: int,
                            server_round: int) -> dict[str, torch.Tensor]:
    """The client's local steps by plain eager autograd and CONFIG's optimizer, from the global LoRA values."""
    model = models.add_lora(models.load(SETTINGS.model, seed=SETTINGS.seed),
                            models.LoraSettings(r=SETTINGS.lora_r, alpha=SETTINGS.lora_alpha))
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in lora.items():
            param.copy_(start[name])
    optimizer = make_optimizer(lora.values(), CONFIG.optimizer, CONFIG.lr)
    batches = data.batches(spec.blocks, SETTINGS.batch_size, seed=SETTINGS.seed + 1000 * server_round + partition)
    for _ in range(CONFIG.local_steps):
        model(**next(batches)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in lora.items()}


def test_federation_averages_what_clients_sent_within_their_budgets_and_survives_faults(monkeypatch):
    monkeypatch.setenv("MEBP_FAULT_AT", f"federate-client-{KILLED}-round-2")  # read by each actor at import
    specs = client_specs()
    result = federated.run_federation(SETTINGS, specs, rounds=2, config=CONFIG, parallel=len(specs))

    assert [r.round for r in result.rounds] == [0, 1, 2]  # the run went on to its last round
    start = result.rounds[0].aggregate
    for record, expected in zip(result.rounds[1:], ({0, 1, KILLED}, {0, 1})):
        clients = {int(r.metrics["client"]) for r in record.replies}
        assert clients == expected
        refusals = [reason for reason in record.failures.values() if "refuses to train" in reason]
        assert len(refusals) == 1 and "client 2" in refusals[0] and "least feasible budget" in refusals[0]
        assert len(record.failures) == 4 - len(expected)  # round 2: the refusal and the killed client
        mean, magnitude = fedavg(record.replies), fedavg(record.replies, absolute=True)
        assert set(record.aggregate) == set(mean) == set(start)
        # Flower sums k float32 products in some order and rounds: within (k + 1) u of the
        # weighted mean of the |values| (Higham, Lemma 3.1 and eq. 3.5), plus u of the result.
        terms = len(record.replies) + 1
        for name, value in mean.items():
            bound = terms * FLOAT32_UNIT_ROUNDOFF * magnitude[name] + FLOAT32_UNIT_ROUNDOFF * value.abs()
            assert ((record.aggregate[name].double() - value).abs() <= bound).all(), name
        for reply in record.replies:
            spec = specs[int(reply.metrics["client"])]
            assert reply.metrics["budget-bytes"] == spec.budget_bytes
            assert reply.metrics["held-peak-bytes"] <= spec.budget_bytes
            assert reply.metrics["num-examples"] == spec.blocks.shape[0]

    first = {int(r.metrics["client"]): r for r in result.rounds[1].replies}
    # Different budgets, different schedules: the tight client recomputes, the roomy one keeps everything.
    assert first[0].metrics["recomputed-tensors"] == 0 < first[1].metrics["recomputed-tensors"]
    # What a client sent is its local training from the global values, as plain autograd computes it.
    second = {int(r.metrics["client"]): r for r in result.rounds[2].replies}
    for partition, server_round, begin, reply in ((1, 1, start, first[1]),
                                                  (0, 2, result.rounds[1].aggregate, second[0])):
        reference = autograd_local_training(begin, specs[partition], partition, server_round)
        for name, value in reference.items():
            # Two SGD steps move each parameter by at most 2 lr x the project's gradient
            # tolerance (1e-5 of the largest gradient) from autograd's: far inside atol.
            torch.testing.assert_close(reply.arrays[name], value, rtol=1e-4, atol=1e-6)
    assert result.final.keys() == start.keys()


def test_cli_federate_refuses_budgets_that_do_not_match_the_clients(capsys):
    from mebp_compiler.app.cli import main

    assert main(["federate", "--model", "tiny-llama", "--clients", "3", "--budgets", "1MB,2MB"]) == 2
    assert "2 budgets for 3 --clients" in capsys.readouterr().err
    assert main(["federate", "--model", "tiny-llama", "--clients", "2"]) == 2
    assert "give --budgets for tiny-llama" in capsys.readouterr().err
    assert main(["federate", "--model", "tiny-llama", "--budgets", "1MB,lots"]) == 2
    assert "--budgets" in capsys.readouterr().err
