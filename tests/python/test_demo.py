"""The demo's models, workload and table (the end-to-end run is in test_cli.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from apportion import demo  # noqa: E402
from apportion.config import ConfigError  # noqa: E402
from apportion.tune import Measured  # noqa: E402


@pytest.mark.parametrize(("build", "make"), [(demo.build_mlp, demo.mlp_input), (demo.build_conv, demo.conv_input),
                                             (demo.build_encoder, demo.encoder_input)])
def test_models_accept_one_request_or_a_stacked_batch(build, make) -> None:
    m = build(None).eval()
    x = make()
    with torch.inference_mode():
        one = m(x)
        batch = m(torch.stack([x, x, x]))
    assert batch.shape == (3, *one.shape)
    torch.testing.assert_close(batch[1], one, rtol=1e-4, atol=1e-4)


def test_workload_scales_with_the_machine() -> None:
    ms = {"mlp": 2.0, "conv": 2.0, "encoder": 2.0}
    cfg = demo.demo_config(1.0, per_request_ms=ms, cpus=2)
    assert cfg.rate == pytest.approx(1000.0)  # 2 cores / 2 ms per request
    assert sum(cfg.demand().values()) == pytest.approx(1000.0)
    assert all(m.slo and m.spec.timeout_ms == m.slo["latency_ms"] for m in cfg.models.values())
    assert demo.demo_config(100.0, per_request_ms=ms, cpus=2).rate == demo.MAX_TOTAL_RATE
    # A load that rounds to no requests at all failed later, as "model 'mlp': rate ... got 0.0".
    with pytest.raises(ConfigError, match=r"<command line>: --load: 1e-06 x the machine's one-thread capacity"):
        demo.demo_config(1e-6, per_request_ms=ms, cpus=2)


def test_baselines() -> None:
    cfg = demo.demo_config(1.0, per_request_ms={"mlp": 1, "conv": 1, "encoder": 1}, cpus=2)
    two = demo.baselines(cfg, 2)
    assert {c.threads for c in two["unmanaged"].values()} == {2}
    assert {(c.isolation, c.threads) for c in two["equal split"].values()} == {("shared", 1)}
    six = demo.baselines(cfg, 6)
    assert {(c.isolation, c.cores, c.threads) for c in six["equal split"].values()} == {("exclusive", 2, 2)}


def test_table_reports_ratios() -> None:
    cfg = demo.demo_config(1.0, per_request_ms={"mlp": 1, "conv": 1, "encoder": 1}, cpus=2)

    def res(good: float, met: bool) -> dict[str, Measured]:
        return {n: Measured(good, good, 10.0, met, 100.0, expired=0 if met else 4) for n in cfg.models}

    d = demo.DemoResult(cfg, {"unmanaged": res(10, False), "equal split": res(20, True), "tuned": res(30, True)},
                        cfg, {}, 1.0)
    text = d.table()
    assert "tuned goodput: 3.00x unmanaged, 1.50x equal split" in text
    assert text.splitlines()[0].split() == ["mode", "model", "demand/s", "req/s", "good/s", "p99", "ms", "expired",
                                            "SLO", "met"]
    rows = [line.split() for line in text.splitlines()]
    assert [r[6] for r in rows if r[:2] == ["unmanaged", "mlp"]] == ["4"]  # the met verdict counts them
    assert [r[-2] for r in rows if r[:2] == ["unmanaged", "TOTAL"]] == ["12"]


def test_the_shift_moves_shares_and_keeps_the_total() -> None:
    cfg = demo.demo_config(1.0, per_request_ms={"mlp": 1, "conv": 1, "encoder": 1}, cpus=2)
    new = demo.shifted(cfg)
    before, after = cfg.demand(), new.demand()
    assert sum(after.values()) == pytest.approx(sum(before.values()))
    # The default shift: conv 20% -> 85%, mlp 35% -> 5%, encoder 45% -> 10%.
    assert after["conv"] == pytest.approx(4.25 * before["conv"])
    assert after["mlp"] == pytest.approx(before["mlp"] * 5 / 35)
    assert after["encoder"] == pytest.approx(before["encoder"] * 10 / 45)
    assert {n: m.spec for n, m in new.models.items()} == {n: m.spec for n, m in cfg.models.items()}


def test_adapted_says_how_long_after_the_shift_the_last_move_came() -> None:
    spec = demo.ModelSpec("mlp", model=lambda x: x)
    moves = [demo.Move(1.0, "mlp", "x", "r", spec), demo.Move(7.5, "mlp", "y", "r", spec),
             demo.Move(9.0, "encoder", "z", "r", spec)]
    assert demo.Adapted({}, moves, shift_at_s=5.0).adapted_s == pytest.approx(4.0)
    assert demo.Adapted({}, moves[:1], shift_at_s=5.0).adapted_s is None


def test_table_compares_the_controller_with_the_static_plan_after_the_shift() -> None:
    cfg = demo.demo_config(1.0, per_request_ms={"mlp": 1, "conv": 1, "encoder": 1}, cpus=2)

    def res(good: float, met: bool) -> dict[str, Measured]:
        return {n: Measured(good, good, 10.0, met, 100.0) for n in cfg.models}

    new = demo.shifted(cfg).demand()
    spec = demo.ModelSpec("mlp", model=lambda x: x)
    d = demo.DemoResult(cfg, {"unmanaged": res(10, False), "equal split": res(20, True), "tuned": res(30, True),
                              "shift: static": res(20, False), "shift: controller": res(30, True),
                              "shift: retuned": res(32, True)},
                        cfg, {}, 1.0, {m: new for m in ("shift: static", "shift: controller", "shift: retuned")},
                        demo.Adapted({}, [demo.Move(6.0, "mlp", "x", "r", spec)], shift_at_s=4.0,
                                     longest_miss=(1.5, "mlp")))
    text = d.table()
    assert "after the shift: controller 1.50x static, 94% of a plan retuned for the new mix; last move 2.0 s " \
           "after the shift; longest SLO miss after it 1.5 s (mlp)" in text
    d.adapted = demo.Adapted({}, [], shift_at_s=4.0)
    assert "no move after the shift; no SLO miss in any window after it" in d.table()
    mlp_rows = [line.split() for line in text.splitlines() if " mlp " in f" {line} "]
    assert [r[-7] for r in mlp_rows if r[0] == "shift:"] == [f"{new['mlp']:.0f}"] * 3


def test_table_says_what_share_of_the_new_demand_each_mode_served() -> None:
    cfg = demo.demo_config(1.0, per_request_ms={"mlp": 1, "conv": 1, "encoder": 1}, cpus=2)

    def res(good: float) -> dict[str, Measured]:
        return {n: Measured(good, good, 10.0, True, 100.0) for n in cfg.models}

    demand = {"mlp": 140.0, "conv": 40.0, "encoder": 20.0}  # 200/s in all after the shift
    results = {"unmanaged": res(10), "equal split": res(20), "tuned": res(30),
               "shift: static": res(40), "shift: controller": res(50)}
    d = demo.DemoResult(cfg, results, cfg, {}, 1.0, {m: demand for m in ("shift: static", "shift: controller")})
    assert "  of the new demand served within SLO: static 60%, controller 75%" in d.table()
    # Without the shifted demand recorded there is nothing to divide by: no line.
    assert "of the new demand" not in demo.DemoResult(cfg, results, cfg, {}, 1.0).table()


def test_adapted_lists_each_move_and_each_model_held_at_risk_without_one() -> None:
    spec = demo.ModelSpec("mlp", model=lambda x: x)
    a = demo.Adapted({}, [demo.Move(3.0, "mlp", "batch 8 -> 16", "SLO at risk", spec),
                          demo.Move(7.5, "conv", "instances 1 -> 2", "idle CPUs", spec)], shift_at_s=5.0,
                     held={"mlp": (4, "SLO at risk: ...; held: no free capacity")})
    assert a.describe() == [
        "  2.0 s before the shift: mlp: batch 8 -> 16 (SLO at risk)",
        "  2.5 s after the shift: conv: instances 1 -> 2 (idle CPUs)",
        "held after the shift: mlp most at risk without a move in 4 window(s); last: SLO at risk: ...; held: no free capacity",
    ]
    assert demo.Adapted({}, [], shift_at_s=5.0).describe() == []


def test_shift_shares_parse_every_model_once_adding_up_to_one() -> None:
    assert demo.parse_shares("encoder=0.05, mlp=0.85,conv=0.1") == {"mlp": 0.85, "conv": 0.1, "encoder": 0.05}
    assert list(demo.parse_shares("encoder=0.05,mlp=0.85,conv=0.1")) == list(demo.SHARES)  # the demo's order
    assert demo.parse_shares("mlp=1,conv=0,encoder=0") == {"mlp": 1.0, "conv": 0.0, "encoder": 0.0}
    cfg = demo.demo_config(1.0, per_request_ms={"mlp": 1, "conv": 1, "encoder": 1}, cpus=2)
    after = demo.shifted(cfg, demo.parse_shares("mlp=0.85,conv=0.1,encoder=0.05")).demand()
    assert after["mlp"] == pytest.approx(0.85 * cfg.rate) and sum(after.values()) == pytest.approx(cfg.rate)


@pytest.mark.parametrize(("text", "message"), [
    ("mlp=0.7,conv=0.2", "every model needs a share; missing: encoder"),
    ("mlp=0.7,conv=0.2,encoder=0.2", "the shares add up to 1.1, not 1"),
    ("mlp=0.7,conv=0.2,ranker=0.1", "'ranker' is not one of the demo's models (mlp, conv, encoder)"),
    ("mlp=0.5,mlp=0.3,conv=0.1,encoder=0.1", "'mlp' is given twice"),
    ("mlp=0.7,conv,encoder=0.1", "expected MODEL=SHARE, got 'conv'"),
    ("mlp=lots,conv=0.2,encoder=0.1", "mlp: expected a share such as 0.25, got 'lots'"),
    ("mlp=1.2,conv=-0.2,encoder=0", "conv: a share is a finite number >= 0, got '-0.2'"),
    ("mlp=nan,conv=0.2,encoder=0.1", "mlp: a share is a finite number >= 0, got 'nan'"),
])
def test_shift_shares_refuse_what_is_not_a_mix(text: str, message: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError) as e:
        demo.parse_shares(text)
    assert message in str(e.value)


def test_a_load_past_the_generators_cap_says_what_is_offered() -> None:
    # --load 1e308 printed "3000 req/s in total (1e+308x the one-thread capacity)".
    from apportion.demo import MAX_TOTAL_RATE, demo_config, offered

    ms = {"mlp": 1.0, "conv": 1.0, "encoder": 1.0}  # 2 CPUs: 2,000 req/s at one thread each
    assert demo_config(1e308, per_request_ms=ms, cpus=2).rate == MAX_TOTAL_RATE
    assert offered(1e308, MAX_TOTAL_RATE, ms, cpus=2) == (
        "1.50x the one-thread capacity: --load 1e+308, capped at the load generator's 3000 req/s")
    assert demo_config(0.5, per_request_ms=ms, cpus=2).rate == 1000.0
    assert offered(0.5, 1000.0, ms, cpus=2) == "0.5x the one-thread capacity"


def test_the_median_round_is_the_middle_total_goodput() -> None:
    assert demo.median_round([10.0, 2.0, 31.0]) == 0
    assert demo.median_round([9.0]) == 0
    assert demo.median_round([4.0, 1.0, 3.0, 2.0]) == 3  # even: the lower middle (2 of 1, 2, 3, 4)
    assert demo.median_round([2.0, 2.0, 2.0]) == 1  # equal totals: in order, the middle
    with pytest.raises(ValueError, match="no rounds"):
        demo.median_round([])


def test_table_with_rounds_gives_each_rounds_goodput_and_the_worst_adaptation() -> None:
    cfg = demo.demo_config(1.0, per_request_ms={"mlp": 1, "conv": 1, "encoder": 1}, cpus=2)

    def res(good: float) -> dict[str, Measured]:
        return {n: Measured(good, good, 10.0, True, 100.0) for n in cfg.models}

    spec = demo.ModelSpec("mlp", model=lambda x: x)
    new = demo.shifted(cfg).demand()
    modes = ("shift: static", "shift: controller", "shift: retuned")
    rounds = [demo.Adapted({}, [demo.Move(6.0, "mlp", "x", "r", spec)], shift_at_s=4.0, longest_miss=(0.5, "conv")),
              demo.Adapted({}, [demo.Move(13.0, "mlp", "x", "r", spec)], shift_at_s=4.0),
              demo.Adapted({}, [], shift_at_s=4.0, longest_miss=(1.5, "mlp"))]
    d = demo.DemoResult(cfg, {"unmanaged": res(10), "equal split": res(20), "tuned": res(30),
                              "shift: static": res(20), "shift: controller": res(30), "shift: retuned": res(32)},
                        cfg, {}, 1.0, {m: new for m in modes}, rounds[0],
                        {"shift: static": [60.0, 66.0, 63.0], "shift: controller": [90.0, 99.0, 96.0],
                         "shift: retuned": [96.0, 93.0, 99.0]}, rounds)
    text = d.table()
    assert ("last move 9.0 s after the shift (the latest over 3 rounds); longest SLO miss after it 1.5 s (mlp) "
            "(the longest over 3 rounds)") in text
    assert ("  each after-shift row is the median of its rounds (goodput, in order): static 60/66/63; "
            "controller 90/99/96; retuned 96/93/99") in text
    # No round moved or missed: said once, without a count.
    d.adapted_rounds = [demo.Adapted({}, [], shift_at_s=4.0)] * 3
    assert "; no move after the shift; no SLO miss in any window after it" in d.table()
    # One round: no rounds line, and the figures are that round's.
    single = demo.DemoResult(cfg, d.results, cfg, {}, 1.0, d.demands, rounds[1])
    assert "median of its rounds" not in single.table() and "last move 9.0 s after the shift;" in single.table()


def test_run_demo_refuses_rounds_below_one() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
            demo.run_demo(rounds=bad)  # type: ignore[arg-type]
