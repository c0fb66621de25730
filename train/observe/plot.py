"""The report's picture (``python -m train.report RUN_DIR --plot out.png``; needs matplotlib):
loss against step with every resume marked and the re-run steps shown apart, then world size and
throughput against wall-clock time with the recoveries shaded."""

from __future__ import annotations

import itertools
from pathlib import Path

from train.observe import records


def draw(run_dir: str | Path, report: dict, out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = records.read(run_dir)
    steps = [r for r in rows if r["kind"] == "train"]
    final: dict[int, dict] = {r["step"]: r for r in steps}  # the row the final model went through
    rerun = [r for r in steps if final[r["step"]] is not r]
    vals = {r["step"]: r["val_loss"] for r in rows if r["kind"] == "val"}
    t0 = rows[0]["time"] if rows else 0.0

    fig, (ax_loss, ax_world, ax_rate) = plt.subplots(
        3, 1, figsize=(10, 8), gridspec_kw={"height_ratios": [3, 1, 1.4]}, constrained_layout=True
    )
    xs = sorted(final)
    ax_loss.plot(xs, [final[s]["loss"] for s in xs], lw=1, color="tab:blue", label="train loss")
    if rerun:
        ax_loss.scatter([r["step"] for r in rerun], [r["loss"] for r in rerun], s=6, color="tab:orange",
                        label="steps run before a failure (re-run after it)", zorder=3)  # fmt: skip
    if vals:
        ax_loss.plot(
            sorted(vals), [vals[s] for s in sorted(vals)], "o-", color="tab:green", label="validation loss"
        )
    for n, i in enumerate(report["incidents"], 1):
        ax_loss.axvline(i["resumed_from_step"], color="tab:red", lw=0.8, ls="--")
        label = f"{n}: {i['cause'].split(';')[0].split(' (')[0][:48]}, {i['steps_lost']} lost "
        ax_loss.annotate(label, (i["resumed_from_step"], 0.97), xycoords=("data", "axes fraction"),
                         rotation=90, va="top", ha="right", fontsize=7, color="tab:red")  # fmt: skip
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(
        f"{Path(run_dir).name}: {report['steps_done']} steps, {len(report['incidents'])} incident(s)"
    )
    ax_loss.legend(loc="upper right", fontsize=8)

    times = [r["time"] - t0 for r in steps]
    ax_world.step(times, [r["world_size"] for r in steps], where="post", color="tab:purple")
    ax_world.set_ylabel("world size")
    # Wall-clock rate between consecutive steps of one attempt (sleeps, saves and evals included).
    pairs = [(b["time"] - t0, 1.0 / (b["time"] - a["time"])) for a, b in itertools.pairwise(steps)
             if b["step"] == a["step"] + 1 and b["time"] > a["time"]]  # fmt: skip
    ax_rate.plot([t for t, _ in pairs], [r for _, r in pairs], ".", ms=2, color="tab:blue")
    ax_rate.set_ylabel("steps/s")
    ax_rate.set_xlabel("wall-clock time, s")
    for i in report["incidents"]:
        if "span" in i:
            for ax in (ax_world, ax_rate):
                ax.axvspan(i["span"][0] - t0, i["span"][1] - t0, color="tab:red", alpha=0.15, lw=0)
    ax_world.sharex(ax_rate)
    fig.savefig(out, dpi=110)
    plt.close(fig)
