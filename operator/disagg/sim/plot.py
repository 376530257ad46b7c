"""One figure of a simulated run: load, replicas per pool and latency over time, one panel each."""

from __future__ import annotations

from pathlib import Path

from disagg.sim.engine import SimResult


def plot_run(result: SimResult, path: Path | str, title: str = "") -> None:
    """Write a PNG of `result`'s timeline (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = result.timeline
    hours = [t / 3600.0 for t in timeline.time_s]
    figure, (load, replicas, latency) = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True, dpi=80)
    load.plot(hours, timeline.request_rate, color="tab:gray", linewidth=0.8)
    load.set_ylabel("requests/s")
    load.set_title(title or result.policy)
    tokens = load.twinx()
    tokens.plot(hours, [v / 1000.0 for v in timeline.prompt_tokens_per_s], color="tab:purple", linewidth=0.6,
                alpha=0.6)
    tokens.set_ylabel("prompt k tok/s", color="tab:purple")
    replicas.step(hours, timeline.prefill_replicas, where="post", label="prefill", color="tab:blue")
    replicas.step(hours, timeline.decode_replicas, where="post", label="decode", color="tab:orange")
    replicas.set_ylabel("replicas")
    replicas.legend(loc="upper left")
    latency.plot(hours, timeline.ttft_p90_s, label="TTFT p90 (s)", color="tab:blue", linewidth=0.8)
    latency.axhline(result.ttft_target_s, color="tab:blue", linestyle="--", linewidth=0.8)
    latency.set_ylabel("TTFT p90 s")
    latency.set_yscale("log")
    itl = latency.twinx()
    itl.plot(hours, [v * 1000.0 for v in timeline.itl_p90_s], color="tab:orange", linewidth=0.8)
    itl.axhline(result.itl_target_s * 1000.0, color="tab:orange", linestyle="--", linewidth=0.8)
    itl.set_ylabel("ITL p90 ms", color="tab:orange")
    latency.set_xlabel("hours")
    summary = result.summary()
    hours_used = summary["accelerator_hours"]
    assert isinstance(hours_used, dict)
    latency.set_title(
        f"SLO attainment {result.attainment():.2%}, {hours_used['total']:.0f} accelerator-hours "
        f"(dashed: targets)", fontsize=9,
    )
    for axis in (load, replicas, latency):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path))
    plt.close(figure)
