"""The simulator: traces, workload construction, the pools' behaviour and the policies in the loop."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

from disagg.capacity import builtin_model
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.scaling.policy import LoadPicture, share_above
from disagg.sim.baselines import StaticController, find_static_best, run_static
from disagg.sim.cli import simulate_main
from disagg.sim.controllers import DisaggController
from disagg.sim.engine import PoolSetup, SimSetup, simulate
from disagg.sim.traces import TraceError, Workload, build_workload, diurnal_curve, read_trace

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"
SETUP = SimSetup(
    model=builtin_model("llama-3.1-70b"),
    prefill=PoolSetup(DEFAULT_CATALOG["nvidia-h100"], 2, 2, 1, 16),
    decode=PoolSetup(DEFAULT_CATALOG["nvidia-h200"], 1, 2, 1, 16),
    ttft_s=1.0, itl_s=0.05, dt=0.2,
)


def poisson(rate: float, seconds: float, prompt: int = 1500, output: int = 150, seed: int = 1) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, int(rate * seconds * 1.2)))
    arrivals = arrivals[arrivals < seconds]
    n = arrivals.size
    return Workload("poisson", arrivals, np.full(n, prompt, dtype=np.int64), np.full(n, output, dtype=np.int64),
                    seconds)


def test_reads_both_formats(tmp_path: Path) -> None:
    azure = tmp_path / "a.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n"
                     "2023-11-16 18:17:04.0319600,3180,8\n")
    mooncake = tmp_path / "m.jsonl"
    mooncake.write_text('{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0]}\n'
                        '{"timestamp": 1500, "input_length": 10, "output_length": 3, "hash_ids": [1]}\n')
    a = read_trace(azure)
    assert a.requests == 2 and a.arrivals[1] == pytest.approx(0.052, abs=1e-6)
    assert list(a.prompt_tokens) == [4808, 3180]
    m = read_trace(mooncake)
    assert list(m.arrivals) == [0.0, 1.5] and list(m.output_tokens) == [500, 3]
    bad = tmp_path / "x.txt"
    bad.write_text("hello\n")
    with pytest.raises(TraceError, match="not a known trace format"):
        read_trace(bad)


@pytest.mark.skipif(not TRACES.exists(), reason="shared traces not present")
def test_shared_traces_load_with_their_documented_sizes() -> None:
    assert read_trace(TRACES / "azure2023_conv.csv").requests == 19366
    assert read_trace(TRACES / "mooncake_synthetic.jsonl").requests == 3993


def test_time_scale_and_diurnal_construction() -> None:
    hour = poisson(2.0, 3600.0)
    fast = build_workload(hour, time_scale=4.0)
    assert fast.duration_s == pytest.approx(900.0) and fast.requests == hour.requests
    day = build_workload(hour, time_scale=4.0, diurnal=5.0)
    assert day.duration_s == 86400.0
    peak = day.window(15 * 3600.0, 17 * 3600.0).mean_rate()
    trough = day.window(3 * 3600.0, 5 * 3600.0).mean_rate()
    assert peak == pytest.approx(8.0, rel=0.1)  # the peak runs at F x the trace's rate
    assert peak / trough == pytest.approx(5.0, rel=0.2)
    assert diurnal_curve(np.array([4 * 3600.0, 16 * 3600.0]), 10.0) == pytest.approx([0.1, 1.0])
    again = build_workload(hour, time_scale=4.0, diurnal=5.0)
    assert again.requests == day.requests  # seeded: reproducible


def test_enough_replicas_meet_the_slo_and_too_few_do_not() -> None:
    load = poisson(8.0, 300.0)
    enough = run_static(SETUP, load, {"prefill": 2, "decode": 2})
    assert enough.attainment() > 0.99
    assert enough.accelerator_hours()["total"] == pytest.approx((2 * 2 + 2) * 300 / 3600, rel=0.02)
    starved = run_static(SETUP, load, {"prefill": 1, "decode": 1})
    assert starved.attainment() < 0.5


def test_kv_capacity_limits_decode_admission() -> None:
    long = poisson(0.5, 300.0, prompt=60_000, output=500)  # ~2.6 sequences fit one H200 KV cache
    one = run_static(SETUP, long, {"prefill": 8, "decode": 1})
    many = run_static(SETUP, long, {"prefill": 8, "decode": 6})
    assert np.median(one.ttft_s) > 5 * np.median(many.ttft_s)


@dataclass
class _Watcher(StaticController):
    """A constant allocation that keeps every picture it is shown, every 15 s."""

    interval_s: float = 15.0
    pictures: list[LoadPicture] = field(default_factory=list)

    def decide(self, now: float, picture: LoadPicture | None, current: dict[str, int]) -> dict[str, int]:
        if picture is not None:
            self.pictures.append(picture)
        return super().decide(now, picture, current)


def test_decode_reports_its_own_ttft_with_the_wait_for_admission() -> None:
    # What a vLLM decode pod's TTFT histogram holds: from the prefill's hand-off to the first token, so a
    # KV cache too small for the load shows there (and not in prefill's TTFT).
    long = poisson(0.5, 300.0, prompt=60_000, output=500)
    worst: dict[int, tuple[float, float]] = {}
    for decode in (1, 6):
        counts = {"prefill": 8, "decode": decode}
        watcher = _Watcher(counts)
        setup = replace(SETUP, prefill=replace(SETUP.prefill, initial_replicas=8),
                        decode=replace(SETUP.decode, initial_replicas=decode))
        simulate(setup, long, watcher)
        decode_ttft = [p.decode.ttft_s for p in watcher.pictures if p.decode and p.decode.ttft_s is not None]
        prefill_ttft = [p.prefill.ttft_s for p in watcher.pictures if p.prefill and p.prefill.ttft_s is not None]
        worst[decode] = (max(decode_ttft), max(prefill_ttft))
    # one replica: requests wait for a full KV cache; six: the hand-off of 60k tokens (~5 s) and a step
    assert worst[1][0] > 5 * worst[6][0], worst
    assert worst[6][0] < 10.0, worst
    assert worst[1][1] == pytest.approx(worst[6][1], rel=0.05), worst  # prefill's TTFT holds none of it


def test_the_ttft_histograms_the_policy_sees_count_the_requests_over_the_target() -> None:
    # what the error budget reads: the rate window's TTFT histogram, as requests per second per bucket
    load = poisson(12.0, 300.0, seed=4)
    shares: dict[int, list[float]] = {}
    for prefill in (1, 4):
        watcher = _Watcher({"prefill": prefill, "decode": 2})
        setup = replace(SETUP, prefill=replace(SETUP.prefill, initial_replicas=prefill))
        simulate(setup, load, watcher)
        late = [p.prefill for p in watcher.pictures[-10:] if p.prefill is not None and p.prefill.ttft_buckets]
        assert late
        if prefill == 4:  # keeping up: the first tokens come as fast as the requests (12/s)
            assert all(pool.ttft_buckets[-1][1] == pytest.approx(12.0, rel=0.35) for pool in late)
        shares[prefill] = [share_above(SETUP.ttft_s, pool.ttft_buckets) or 0.0 for pool in late]
    # one replica for ~2 replicas' load: the queue grows and nearly every request is late; four: none
    assert min(shares[1]) > 0.9, shares
    assert max(shares[4]) < 0.01, shares


def test_startup_delay_and_our_policy_scale_up_on_a_step() -> None:
    quiet = poisson(2.0, 300.0, seed=2)
    busy = poisson(16.0, 600.0, seed=3)
    step = Workload("step", np.concatenate([quiet.arrivals, busy.arrivals + 300.0]),
                    np.concatenate([quiet.prompt_tokens, busy.prompt_tokens]),
                    np.concatenate([quiet.output_tokens, busy.output_tokens]), 900.0)
    result = simulate(SETUP, step, DisaggController(SETUP, DEFAULT_CATALOG), record_decisions=True)
    ups = [(t, role) for t, role, change in result.decisions if int(change.split()[-1]) > int(change.split()[0])]
    assert ups and ups[0][0] >= 300.0
    first_prefill = min(t for t, role in ups if role == "prefill")
    assert first_prefill <= 300.0 + 60.0  # scrape + delay + tick
    assert result.max_replicas["prefill"] >= 3
    tail = result.ttft_s[step.arrivals > 300.0 + 120.0]  # once the new replicas serve
    assert np.mean(tail <= SETUP.ttft_s) > 0.95


def test_static_best_finds_the_cheapest_constant_allocation() -> None:
    load = poisson(8.0, 300.0)
    counts, result = find_static_best(SETUP, load, start={"prefill": 2, "decode": 2})
    assert result.attainment() >= 0.99
    fewer_prefill = run_static(SETUP, load, {**counts, "prefill": counts["prefill"] - 1})
    assert counts["prefill"] == 1 or fewer_prefill.attainment() < 0.99


def test_simulate_cli_prints_the_issue_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.exponential(0.25, 600)) * 1000
    trace.write_text("".join(
        json.dumps({"timestamp": int(t), "input_length": 1200, "output_length": 100, "hash_ids": []}) + "\n"
        for t in times
    ))
    plot = tmp_path / "run.png"
    code = simulate_main(["--trace", str(trace), "--policy", "disagg,hpa", "-o", "json", "--ttft-ms", "1000",
                          "--dt", "0.2", "--plot", str(plot)])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["policy"] for row in rows] == ["disagg", "hpa"]
    assert set(rows[0]) == {
        "policy", "requests", "slo_attainment", "ttft_ms", "itl_ms", "accelerator_hours", "cost_usd",
        "max_replicas", "scale_events", "sim_wall_s",
    }
    assert set(rows[0]["accelerator_hours"]) == {"prefill", "decode", "total"}
    assert plot.stat().st_size > 10_000
    assert simulate_main(["--trace", str(trace), "--policy", "nope"]) == 2


def test_warmup_is_replayed_but_neither_billed_nor_measured() -> None:
    from dataclasses import replace

    from disagg.sim.traces import with_warmup

    load = poisson(8.0, 600.0)
    warm = with_warmup(load, 120.0)
    assert warm.duration_s == pytest.approx(720.0)
    assert warm.requests == load.requests + load.window(480.0, 600.0).requests
    assert np.all(np.diff(warm.arrivals) >= 0)
    setup = replace(SETUP, warmup_s=120.0)
    result = run_static(setup, warm, {"prefill": 2, "decode": 2})
    assert result.requests == load.requests  # only the requests after the warm-up count
    assert result.accelerator_hours()["total"] == pytest.approx((2 * 2 + 2) * 600 / 3600, rel=0.02)
    assert result.timeline.time_s[0] == pytest.approx(60.0)  # measured time starts at 0


def test_static_best_trades_between_the_pools_when_that_is_cheaper() -> None:
    # Prefill replicas cost two accelerators, decode replicas one: the search also tries one prefill
    # replica fewer for more decode, and keeps the cheapest allocation that reaches the target.
    load = poisson(12.0, 300.0, prompt=3000, output=300)
    counts, result = find_static_best(SETUP, load, start={"prefill": 3, "decode": 3})
    assert result.attainment() >= 0.99
    cost = 2 * counts["prefill"] + counts["decode"]
    for p, d in [(counts["prefill"] - 1, counts["decode"] + 1), (counts["prefill"], counts["decode"] - 1)]:
        if p >= 1 and d >= 1 and 2 * p + d < cost:
            assert run_static(SETUP, load, {"prefill": p, "decode": d}).attainment() < 0.99


def test_a_run_that_measures_nothing_is_refused_not_reported() -> None:
    from dataclasses import replace

    from disagg.sim.engine import NothingMeasured
    from disagg.sim.traces import with_warmup

    load = poisson(4.0, 600.0)
    static = StaticController({"prefill": 1, "decode": 1})
    cases = [
        # a warm-up as long as the workload: it used to report 100 % attainment at 0 accelerator-hours
        (replace(SETUP, warmup_s=300.0), with_warmup(load.window(0.0, 300.0), 299.0), "warmup_s"),
        (replace(SETUP, startup_s=300.0), load.window(0.0, 200.0), "duration_s"),
        (replace(SETUP, warmup_s=120.0), replace(load.window(0.0, 100.0), duration_s=600.0), "requests"),
    ]
    for setup, workload, setting in cases:
        with pytest.raises(NothingMeasured) as refused:
            simulate(setup, workload, static)
        assert refused.value.setting == setting
    with pytest.raises(TraceError, match="at least as long as the workload"):
        with_warmup(load, 600.0)


def test_simulate_cli_names_the_flag_of_a_run_that_measures_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(
        json.dumps({"timestamp": t * 500, "input_length": 1200, "output_length": 100, "hash_ids": []}) + "\n"
        for t in range(1200)
    ))  # 600 s
    for flags, named in [
        (["--warmup-s", "600"], "--warmup-s 600"),
        (["--duration", "30"], "--duration"),
        (["--time-scale", "100"], "--time-scale"),
    ]:
        assert simulate_main(["--trace", str(trace), "--dt", "0.5", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"disagg simulate: {named}") and "Traceback" not in err
