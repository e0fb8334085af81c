"""``precompute bench admission`` at a tiny size: every promised key, and hit rates equal to the replay's model."""

from precompute_assets.ml.replay import admission_decisions
from precompute_assets.serving.admission import FrequencySketch, Probation, SecondMiss
from precompute_assets.tools.bench_admission import bench_admission, key_stream


def test_bench_admission_reports_each_policy_beside_the_reference(redis_url, redis_client):
    before = set(redis_client.scan_iter("bench*", count=1000))
    result = bench_admission(redis_url, n_keys=3000, lookups=2000, capacity=150, seed=3)
    assert result["bench"] == "admission" and result["reference"] == "always" and result["capacity"] == 150
    stream = key_stream(3000, 2000, 3)
    models = {
        "always": "always",
        "second_miss": SecondMiss(window_s=3600.0),
        "frequency": FrequencySketch(),
        "probation": Probation(capacity=150),
    }
    assert set(result["policies"]) == set(models)
    for name, policy in models.items():
        stats = result["policies"][name]
        # The real client made the decisions the replay models (markers outlive the run: one window).
        decisions = admission_decisions(stream, policy, window=len(stream) + 1)
        assert stats["hit_rate"] == round(decisions.count("hit") / len(stream), 4), name
        assert stats["errors"] == 0 and stats["p99_us"] >= stats["p50_us"] > 0
        assert stats["hit_p50_us"] > 0 and stats["miss_p50_us"] > 0
        assert result["hit_p50_ratio"][name] == round(
            stats["hit_p50_us"] / result["policies"]["always"]["hit_p50_us"], 3
        )
    # Unbounded, ``always`` keeps every key asked for; probation holds its capacity and no more.
    assert result["policies"]["always"]["live_keys"] == len(set(stream))
    assert result["policies"]["probation"]["live_keys"] == 150
    assert result["hit_p50_ratio"]["always"] == result["miss_p50_ratio"]["always"] == 1.0
    # a naive GET / SET EX read-through of the same stream beside them: it admits every miss, as `always` does
    assert result["bare"]["hit_rate"] == result["policies"]["always"]["hit_rate"]
    assert result["miss_p50_ratio_vs_bare"]["always"] == round(
        result["policies"]["always"]["miss_p50_us"] / result["bare"]["miss_p50_us"], 3
    )
    assert set(redis_client.scan_iter("bench*", count=1000)) <= before  # its namespaces are removed
