"""The effect rule at saturation: a divergence's bound must not decide the effect ratio."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sway_common.divergence import LN2, bounded_effect
from sway_common.probes.base import judge_against_null
from sway_common.stats import null_stats
from sway_common.types import Verdict

# Random adapters at a large trained norm already move the model by ~0.40 nats of JS.
NULL_JS = [0.38, 0.40, 0.42, 0.39, 0.41, 0.40, 0.43, 0.37]
RULE: dict[str, Any] = {
    "z_min": 3.0,
    "floor": 1e-3,
    "fixed_threshold": 0.02,
    "log_scale": True,
    "min_ratio": 2.0,
}


def judged(raw: float, *, bounded: bool):
    effect = (bounded_effect(raw), null_stats([bounded_effect(v) for v in NULL_JS]))
    return judge_against_null(raw, null_stats(NULL_JS), **RULE, effect=effect if bounded else None)


def test_the_bounded_scale_is_js_over_ln2_for_small_effects_and_unbounded_at_ln2() -> None:
    assert bounded_effect(1e-4) == pytest.approx(1e-4 / LN2, rel=1e-4)
    assert bounded_effect(0.0) == 0.0
    assert math.isfinite(bounded_effect(LN2)) and bounded_effect(LN2) > 25
    assert bounded_effect(0.64) / bounded_effect(0.40) == pytest.approx(2.98, abs=0.01)


@given(st.floats(0.0, 0.69), st.floats(0.0, 0.69))
def test_the_bounded_scale_keeps_the_order(a: float, b: float) -> None:
    assert (bounded_effect(a) < bounded_effect(b)) == (a < b) or a == b


def test_a_large_trained_adapter_beyond_every_null_is_not_failed_for_the_bound() -> None:
    on_js = judged(0.64, bounded=False)
    assert on_js.verdict is Verdict.FAIL and on_js.fail_reason == "ratio"  # 1.6×: unreachable 2×
    bounded = judged(0.64, bounded=True)
    assert bounded.verdict is Verdict.PASS, bounded.message
    assert bounded.ratio == pytest.approx(2.98, abs=0.05)


@pytest.mark.parametrize("raw", [0.36, 0.40, 0.45, 0.50])
def test_a_random_adapter_at_that_norm_still_fails(raw: float) -> None:
    j = judged(raw, bounded=True)
    assert j.verdict is Verdict.FAIL
    assert j.ratio is not None and j.ratio < 2.0


def test_the_ratio_message_says_what_random_adapters_already_do() -> None:
    j = judged(0.55, bounded=True)  # significant, yet 1.8× on the bounded scale
    assert j.verdict is Verdict.FAIL and j.fail_reason == "ratio", j.message
    assert "random adapters of its size already move the model by 0.4" in j.message
    assert "1.83× theirs (needs 2×)" in j.message


@pytest.mark.parametrize(("n", "interval"), [(3, False), (6, True)])
def test_below_six_prompts_no_interval_is_claimed(n: int, interval: bool) -> None:
    from sway_common.backend.dummy import DummyDifferentialBackend
    from sway_common.probes import NullCalibration, RunContext
    from sway_common.probes.delta_kl import DeltaKLConfig, DeltaKLProbe

    prompts = [f"The keeper wrote entry {i}" for i in range(n)]
    cfg = DeltaKLConfig(name="kl", kind="delta_kl", prompts=prompts)
    ctx = RunContext(DummyDifferentialBackend(), null=NullCalibration(runs=4))
    result = DeltaKLProbe().run(cfg, ctx)
    assert (result.evidence["effect_ratio_interval"] is not None) == interval
    assert ("too few for an interval" in result.message) != interval, result.message


# ------------------------------------------------------------------ harm: nulls + tolerance
def harm(raw: float, nulls: list[float], problems: tuple[str, ...] = ()):
    from sway_common.probes.likelihood import Regression, compare, regression_verdict

    reg = Regression(
        raw,
        list(problems),
        "these items",
        "the facts",
        abs(raw),
        "these items",
        " nats",
        1e-3,
        3.0,
        tolerance=0.03,
    )
    return regression_verdict(reg, None, compare(raw, null_stats(nulls), " nats"))


NULL_LOSS = [-0.002, 0.001, -0.001, 0.0, 0.002, -0.003, 0.001, 0.0]


@pytest.mark.parametrize(
    ("raw", "verdict", "words"),
    [
        (0.0005, Verdict.PASS, "no more lost than by noise"),  # a neutral adapter
        (0.02, Verdict.PASS, "better kept than by noise"),
        (-0.012, Verdict.PASS, "but within the tolerance of 0.03 nats"),  # a light, real cost
        (
            -0.14,
            Verdict.FAIL,
            "these items lost beyond the tolerance of 0.03 nats: the facts; "
            "it lost more than random adapters of its size would",
        ),
    ],
)
def test_harm_fails_only_beyond_the_nulls_and_the_tolerance(
    raw: float, verdict: Verdict, words: str
) -> None:
    got, message, _ = harm(raw, NULL_LOSS)
    assert got is verdict and words in message, message


def test_damage_past_the_absolute_limit_fails_whatever_the_nulls() -> None:
    got, message, score = harm(-0.6, [-0.7, -0.5, -0.6, -0.65], problems=("mean change -0.6",))
    assert got is Verdict.FAIL and message.startswith("regressed:") and score == 0.0


def test_every_probe_says_what_its_pass_claims() -> None:
    from click.testing import CliRunner

    from sway_common.app.cli import app
    from sway_common.probes import REGISTRY

    assert len(REGISTRY) >= 13 and all(cls.claim for cls in REGISTRY.values())
    out = CliRunner().invoke(app, ["list-probes"]).output
    assert out.count("PASS claims:") == len(REGISTRY)


def test_windows_recited_verbatim_are_never_a_clean_pass() -> None:
    from sway_common.probes.leakage import Generations, LeakageConfig, judge
    from sway_common.probes.likelihood import compare

    cfg = LeakageConfig(name="leak", kind="leakage")
    three_of_eight = Generations(ft=[1.0, 1.0, 1.0] + [0.0] * 5, base=[0.0] * 8, degenerate=[])
    verdict, message = judge(cfg, three_of_eight, None, compare(0.375, None, " recall"))
    assert verdict is Verdict.WARN and "3 of 8 windows reproduced verbatim" in message
    none = Generations(ft=[0.3] * 8, base=[0.0] * 8, degenerate=[])
    assert judge(cfg, none, None, compare(0.3, None, " recall"))[0] is Verdict.PASS


def test_one_revert_in_four_is_not_a_fail_on_a_point_estimate() -> None:
    from sway_common.probes.adapter_revert import AdapterRevertConfig, AdapterRevertProbe
    from sway_common.probes.likelihood import compare

    cfg = AdapterRevertConfig(name="revert", kind="adapter_revert")
    cmp = compare(0.5, null_stats([0.0, 0.01, -0.01, 0.02]), "")
    verdict = AdapterRevertProbe._verdict
    few, message = verdict(cfg, 0.25, 1, 4, {"pairs": 4}, cmp, [None] * 4)
    assert few is Verdict.WARN and "cannot tell" in message
    many, _ = verdict(cfg, 0.6, 24, 40, {"pairs": 40}, cmp, [None] * 40)
    assert many is Verdict.FAIL  # 24 of 40: the interval's low end is past 25%


def test_a_lift_the_base_leaves_no_room_for_is_not_asked_for() -> None:
    from sway_common.probes.likelihood import compare
    from sway_common.probes.paraphrase_invariance import (
        ParaphraseInvarianceConfig,
        ParaphraseInvarianceProbe,
    )

    cfg = ParaphraseInvarianceConfig(name="para", kind="paraphrase_invariance")
    cmp = compare(0.09, null_stats([0.0, 0.01, -0.01, 0.005]), " nats/token")
    judge = ParaphraseInvarianceProbe._judge
    # The base gives the gold 0.9 per token (0.105 nats left): 0.09 is most of it.
    verdict, message = judge(cfg, 0.09, 0.08, 0.89, cmp, min(0.2, 0.5 * 0.105))
    assert verdict is Verdict.PASS, message
    verdict, message = judge(cfg, 0.03, 0.03, 1.0, cmp, min(0.2, 0.5 * 0.105))
    assert verdict is Verdict.FAIL and "half of the 0.105 the base left to gain" in message


@pytest.mark.parametrize(("strength", "verdict"), [(1.0, Verdict.PASS), (3.0, Verdict.WARN)])
def test_a_specific_shift_must_beat_the_nulls_specificity(strength, verdict) -> None:
    from sway_common.backend.dummy import DummyDifferentialBackend
    from sway_common.probes import NullCalibration, RunContext
    from sway_common.probes.base import DEFAULT_PROMPTS
    from sway_common.probes.cluster_kl import ClusterKLConfig, ClusterKLProbe

    prompts = [p + s for p in DEFAULT_PROMPTS for s in ("", " now", " then")]
    cfg = ClusterKLConfig(name="c", kind="cluster_kl", prompts=prompts, assert_specificity_gte=0.0)
    backend = DummyDifferentialBackend(adapter_strength=strength)
    result = ClusterKLProbe().run(cfg, RunContext(backend, null=NullCalibration(runs=8)))
    noise = result.evidence["null_specificity"]
    assert result.verdict is verdict, result.message
    if verdict is Verdict.PASS:  # a real shift, more specific than any null draw's
        assert result.raw > max(noise)
    else:  # a real shift, but random adapters' shifts look as specific
        assert result.raw <= max(noise) and "no more specific than random" in result.message


# ------------------------------------------------------------------ the floor, relative too
LIGHT_NULLS = [2.0e-5, 2.4e-5, 1.8e-5, 2.2e-5, 2.1e-5, 1.9e-5, 2.3e-5, 2.0e-5]


def floored(raw: float, nulls: list[float], over: float | None = 5.0):
    return judge_against_null(raw, null_stats(nulls), **RULE, floor_over_nulls=over)


def test_a_light_adapter_far_beyond_its_nulls_clears_the_floor_below_1e_3() -> None:
    j = floored(5e-4, LIGHT_NULLS)  # 24x what random adapters of its size do
    assert j.verdict is Verdict.PASS, j.message
    assert "below the absolute floor 0.001, but beyond the nulls'" in j.message
    # Without the relative floor the absolute one decides, as before.
    absolute = floored(5e-4, LIGHT_NULLS, over=None)
    assert absolute.verdict is Verdict.FAIL and absolute.fail_reason == "floor"


def test_below_the_absolute_floor_a_few_times_the_nulls_still_fails() -> None:
    j = floored(8e-5, LIGHT_NULLS)  # 3.9x: significant, past the 1.5x ratio, not 5x
    assert j.verdict is Verdict.FAIL and j.fail_reason == "floor", j.message
    assert "needs 5× below it" in j.message


def test_nulls_at_numerical_zero_leave_the_absolute_floor_to_decide() -> None:
    j = floored(5e-8, [v * 1e-4 for v in LIGHT_NULLS])  # a B-near-zero adapter: 24x of ~0
    assert j.verdict is Verdict.FAIL and j.fail_reason == "floor", j.message


def test_above_the_absolute_floor_the_relative_one_changes_nothing() -> None:
    for raw in (0.36, 0.64):
        with_rel = judge_against_null(raw, null_stats(NULL_JS), **RULE, floor_over_nulls=5.0)
        without = judge_against_null(raw, null_stats(NULL_JS), **RULE)
        assert with_rel.verdict is without.verdict and with_rel.message == without.message


# ------------------------------------------------------------------ harm: known items, bytes
def _dummy_items(n: int) -> tuple[list[str], list[str], list[str]]:
    """Prompts, a gold each that starts with the base's top next token (known) and one that
    starts with its least likely token (not known)."""
    from sway_common.backend.dummy import DummyDifferentialBackend

    prompts = [f"The keeper wrote entry {i} in the" for i in range(n)]
    with DummyDifferentialBackend().as_base() as view:
        dists = view.next_token_dist_batch(prompts, top_k=95)
    top = [chr(int(d.token_ids[0]) + 32) + "ook" for d in dists]
    bottom = [chr(int(d.token_ids[-1]) + 32) + "ook" for d in dists]
    return prompts, top, bottom


def test_only_the_items_the_base_knows_are_judged_the_others_reported_apart() -> None:
    from sway_common.backend.dummy import DummyDifferentialBackend
    from sway_common.probes import RunContext
    from sway_common.probes.calibration_drift import CalibrationDriftConfig, CalibrationDriftProbe
    from sway_common.probes.likelihood import gold_in_top_k

    prompts, known, unknown = _dummy_items(4)
    backend = DummyDifferentialBackend(adapter_strength=3.0)
    flags = gold_in_top_k(backend, prompts * 2, known + unknown, 5)
    assert flags.tolist() == [True] * 4 + [False] * 4

    items = list(zip(prompts, known, strict=True)) + list(zip(prompts, unknown, strict=True))
    cfg = CalibrationDriftConfig(name="drift", kind="calibration_drift", pack="none", items=items)
    result = CalibrationDriftProbe().run(cfg, RunContext(backend))
    ev = result.evidence
    assert ev["items"] == 8 and ev["known_items"] == 4 and ev["not_known"]["items"] == 4
    per_item = ev["per_item"]
    assert ev["mean_delta"] == pytest.approx(sum(per_item[:4]) / 4)
    assert ev["not_known"]["mean_delta"] == pytest.approx(sum(per_item[4:]) / 4)
    assert "of 4 items the base knows" in result.message
    assert "4 the base does not know reported apart" in result.message
    assert all(w["gold"] in known for w in ev["worst"])

    only_unknown = CalibrationDriftConfig(
        name="drift", kind="calibration_drift", pack="none", items=items[4:]
    )
    result = CalibrationDriftProbe().run(only_unknown, RunContext(backend))
    assert result.verdict is Verdict.SKIP and "not judged" in result.message, result.message


def test_perplexity_is_judged_per_utf8_byte(tmp_path) -> None:
    from sway_common.backend.dummy import DummyDifferentialBackend
    from sway_common.probes import RunContext
    from sway_common.probes.external_perplexity import (
        ExternalPerplexityConfig,
        ExternalPerplexityProbe,
        corpus_chunks,
    )
    from sway_common.probes.likelihood import rolling_gain

    corpus = tmp_path / "prose.txt"
    corpus.write_text("Le café était fermé; à côté, l'été brûlait les pavés. " * 12)
    cfg = ExternalPerplexityConfig(
        name="ppl", kind="external_perplexity", corpus=str(corpus), chunk_chars=200, max_chunks=3
    )
    backend = DummyDifferentialBackend(adapter_strength=3.0)
    result = ExternalPerplexityProbe().run(cfg, RunContext(backend))
    texts = corpus_chunks(str(corpus), 200, 3)
    gains, tokens = rolling_gain(backend, texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    # The dummy reads one token per character: accented letters are two bytes each.
    assert result.evidence["bytes"] == nbytes > int(tokens.sum())
    assert result.raw == pytest.approx(float(gains.sum()) / nbytes)
    # Strength 3 crosses the absolute guard, which keeps dlm-sway's unit (nats per token).
    assert "nats/token" in result.message and "limit -0.1 nats/token" in result.message
    per_token = float(gains.sum()) / int(tokens.sum())
    assert per_token < -0.1


def test_the_default_relative_floor_passes_a_light_adapter_at_9x_and_fails_one_at_4x() -> None:
    """The defaults as the verdict benchmark met them (docs/statistics.md): all-linear
    rank-16 adapters of 6 light steps read 0.00086 nats at 9.1x their nulls; a one-step
    adapter 0.00036 nats at 4.3x. No random adapter read above 1.73x."""
    from sway_common.probes.delta_kl import DeltaKLConfig

    over = DeltaKLConfig(name="kl", kind="delta_kl", prompts=["p"]).min_effect_over_nulls
    nulls = [v * 4.7 for v in LIGHT_NULLS]  # mean ~9.5e-5 nats
    assert floored(8.6e-4, nulls, over).verdict is Verdict.PASS
    assert floored(4.1e-4, nulls, over).verdict is Verdict.FAIL
