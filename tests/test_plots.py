"""The schedule figures draw every decision and policy in its one PALETTE colour, with legends that name it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import mebp_compiler  # noqa: E402
from mebp_compiler.app.plots import PALETTE, largest_tensors, plot_decisions, plot_memory  # noqa: E402
from tests.conftest import lora_model, random_batch  # noqa: E402


@pytest.fixture(scope="module")
def plan():
    model = lora_model("tiny-llama")
    return mebp_compiler.compile(model, random_batch(model.config.vocab_size, batch=1, seq=16), "mebp")


def same(a, b) -> bool:
    return mcolors.to_rgba(a) == mcolors.to_rgba(b)


def test_decisions_and_policies_have_their_palette_colour_in_every_figure(plan):
    fig, (left, right) = plt.subplots(1, 2)
    plot_memory({"mebp": plan.profile}, left, budget_bytes=plan.predicted_peak_bytes, baselines={"eager": 1 << 20})
    plot_decisions(plan.captured, plan.schedule, right)
    lines = {line.get_label().split(" ")[0]: line.get_color() for line in left.get_lines()}
    assert same(lines["mebp"], PALETTE["mebp"]) and same(lines["eager"], PALETTE["eager"])
    assert same(lines["budget"], PALETTE["budget"])
    bars = {c.get_label(): c.patches[0].get_facecolor() for c in right.containers}
    assert set(bars) == {"keep", "recompute", "offload"}
    assert all(same(colour, PALETTE[decision]) for decision, colour in bars.items())
    plt.close(fig)


def test_largest_tensors_name_their_module_and_layer(plan):
    rows = largest_tensors(plan.captured, plan.schedule, top=5)
    assert len(rows) == 5 and rows == sorted(rows, key=lambda r: -r["bytes"])
    for r in rows:
        origin = plan.schedule.origins[r["tensor"]]
        assert (r["module"], r["layer"]) == (origin.module, origin.layer)
        assert r["layer"] is None or f".layers.{r['layer']}." in r["module"] + "."
