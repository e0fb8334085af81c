"""Next-key accuracy of the LSTM beside Markov-1 and most-popular, scored honestly, and the learned prefetch replay."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from precompute_assets.ml.next_key import (
    NextKeyHyperParams,
    NextKeyModel,
    NextKeyPredictions,
    chosen_prefetch,
    learned_prefetch,
    markov1_predictions,
    next_key_accuracy,
    prefetch_predictions,
    prefetch_replay,
    train_next_key,
)
from precompute_assets.ml.replay import _precomputed_sets, replay

TINY = NextKeyHyperParams(
    vocab_size=64,
    embedding_dim=16,
    hidden_size=32,
    seq_len=32,
    batch_size=16,
    learning_rate=0.02,
    max_epochs=8,
    min_steps=1,
    max_seconds=30.0,
)
PREDICTORS = ("lstm", "markov1", "most_popular")
INTEGER_PREDICTORS = {*PREDICTORS, "markov1_delta"}  # integer keys also get Markov-1 over deltas


def cyclic_days(days=4, per_day=1500, cycle=40, noise=0.1, seed=0) -> list[np.ndarray]:
    """A fixed cycle of ``cycle`` keys walked in order; ``noise`` of the requests are random other keys."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(cycle)
    noisy = rng.random(days * per_day) < noise
    walk = order[np.cumsum(~noisy) % cycle]
    keys = np.where(noisy, cycle + rng.integers(0, 200, size=len(noisy)), walk).astype(np.int64)
    return np.split(keys, days)


def zipf_days(days=4, per_day=1500, keys=200, seed=0) -> list[np.ndarray]:
    """Independent Zipf requests: the previous key says nothing about the next one."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, keys + 1)
    return np.split(rng.choice(keys, size=days * per_day, p=p / p.sum()).astype(np.int64), days)


def objects(*keys: str) -> np.ndarray:
    return np.array(keys, dtype=object)


@pytest.fixture(scope="module")
def cyclic_result():
    return next_key_accuracy(cyclic_days(), train_days=2, hp=TINY)


@pytest.fixture(scope="module")
def zipf_result():
    return next_key_accuracy(zipf_days(), train_days=2, hp=TINY)


def test_a_deterministic_successor_beats_most_popular(cyclic_result):
    top1 = cyclic_result["next_key_top1"]
    assert top1["most_popular"] < 0.05  # one key of a 40-key cycle
    assert top1["markov1"] > 0.7
    assert top1["lstm"] > 0.7
    assert cyclic_result["next_key_eval_requests"] == 3000
    assert cyclic_result["next_key_train_requests"] == 3000


def test_every_position_can_enter_the_loss():
    whole = NextKeyHyperParams(**{**TINY.__dict__, "loss_share": 1.0})
    result = next_key_accuracy(cyclic_days(), train_days=2, hp=whole)
    assert result["next_key_top1"]["lstm"] > 0.7 and result["next_key_lstm_epochs"] == TINY.max_epochs


def test_independent_zipf_traffic_gives_no_gain_over_most_popular(zipf_result):
    top1, top10 = zipf_result["next_key_top1"], zipf_result["next_key_top10"]
    assert top1["most_popular"] > 0.15  # the head key of 200 Zipf keys
    for name in ("lstm", "markov1"):
        assert top1[name] <= top1["most_popular"] + 0.02
        assert top10[name] <= top10["most_popular"] + 0.03


def test_accuracies_are_shares_and_top10_contains_top1(cyclic_result, zipf_result):
    for result in (cyclic_result, zipf_result):
        assert set(result["next_key_top1"]) == set(result["next_key_top10"]) == INTEGER_PREDICTORS
        for name in INTEGER_PREDICTORS:
            assert 0.0 <= result["next_key_top1"][name] <= result["next_key_top10"][name] <= 1.0
        assert 0.0 <= result["next_key_oov_share"] <= 1.0
        assert result["next_key_vocab"] == TINY.vocab_size
        assert 1 <= result["next_key_lstm_epochs"] <= TINY.max_epochs / TINY.loss_share  # each target ~8 times
        assert result["next_key_notes"] and all(isinstance(note, str) for note in result["next_key_notes"])


def test_targets_outside_the_vocabulary_are_misses():
    train = objects(*(["a", "b"] * 50))
    later = objects("c", "c", "a", "b")
    hp = NextKeyHyperParams(
        vocab_size=2, embedding_dim=4, hidden_size=4, seq_len=8, batch_size=4, max_epochs=2, min_steps=1
    )
    result = next_key_accuracy([train, later], train_days=1, hp=hp)
    assert result["next_key_vocab"] == 2
    assert result["next_key_oov_share"] == 0.5
    # Both real keys are in the LSTM's top-10 whatever it learned; the two "c" cannot be.
    assert result["next_key_top10"]["lstm"] == 0.5
    # markov1: after "b" comes "a" (then "b"), "c" was never seen (most popular: "a" then "b", tie by key).
    assert result["next_key_top1"]["markov1"] == 0.5  # "a" after "c" and "b" after "a"
    assert result["next_key_top10"]["markov1"] == 0.5
    assert result["next_key_top1"]["most_popular"] == 0.25
    assert result["next_key_top10"]["most_popular"] == 0.5


def test_the_oov_class_is_never_predicted_even_when_it_is_most_likely():
    rng = np.random.default_rng(3)
    # A random one in four requests is "hot"; every other is a key seen once: OOV is the most frequent class.
    train = objects(*[("hot" if rng.random() < 0.25 else f"once{i}") for i in range(2000)])
    later = objects(*[("hot" if rng.random() < 0.3 else f"new{i}") for i in range(400)])
    hp = NextKeyHyperParams(
        vocab_size=1, embedding_dim=4, hidden_size=8, seq_len=16, batch_size=8, max_epochs=3, min_steps=1
    )
    result = next_key_accuracy([train, later], train_days=1, hp=hp)
    share = float(np.mean(later == "hot"))
    assert result["next_key_vocab"] == 1
    assert result["next_key_oov_share"] == pytest.approx(1 - share)
    assert result["next_key_top1"]["lstm"] == result["next_key_top10"]["lstm"] == pytest.approx(share)
    predictions = prefetch_predictions([train, later], train_days=1, hp=hp)
    assert predictions.keys.shape == (400, 1) and set(predictions.keys.ravel().tolist()) == {"hot"}  # vocab of 1
    assert np.all((predictions.confidence > 0) & (predictions.confidence < 0.5))  # OOV mass is in the softmax


def test_a_single_distinct_training_key_works():
    result = next_key_accuracy([objects("a", "a", "a", "a"), objects("a", "b", "a")], train_days=1, hp=TINY)
    assert result["next_key_vocab"] == 1
    for name in ("lstm", "markov1"):
        assert result["next_key_top1"][name] == pytest.approx(2 / 3)  # "a" is all any of them can predict
    assert result["next_key_top10"]["most_popular"] == pytest.approx(2 / 3)
    one = next_key_accuracy([objects("a"), objects("a", "b")], train_days=1, hp=TINY)  # no pair to train on
    assert one["next_key_lstm_epochs"] == 0
    assert one["next_key_top1"]["lstm"] == 0.5


def scan_days(days=3, per_day=2000, run=8, seed=0) -> list[np.ndarray]:
    """Block-I/O-like scans: runs of ``run`` consecutive addresses, each from a random start in a space so large
    that the later days' addresses were never requested before."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 10**12, size=days * per_day // run)
    return np.split((starts[:, None] + np.arange(run)).ravel().astype(np.int64), days)


def test_a_delta_vocabulary_predicts_keys_never_seen():
    days = scan_days()
    with_deltas = next_key_accuracy(days, train_days=1, hp=TINY)
    keys_only = next_key_accuracy(days, train_days=1, hp=NextKeyHyperParams(**{**TINY.__dict__, "delta_vocab_size": 0}))
    # 7 of every 8 next keys are the current one + 1; none of them was requested in training.
    assert with_deltas["next_key_oov_share"] == keys_only["next_key_oov_share"] == 1.0
    assert with_deltas["next_key_unreachable_share"] == pytest.approx(1 / 8, abs=0.01)
    assert keys_only["next_key_unreachable_share"] == 1.0 and keys_only["next_key_delta_vocab"] == 0
    assert with_deltas["next_key_delta_vocab"] == 1  # +1; every jump is seen once
    assert with_deltas["next_key_top1"]["lstm"] > 0.8 and keys_only["next_key_top1"]["lstm"] == 0.0
    assert with_deltas["next_key_top1"]["markov1_delta"] > 0.8
    assert with_deltas["next_key_top1"]["markov1"] == keys_only["next_key_top1"]["markov1"] == 0.0
    # Prefetch predictions name the keys the deltas reach.
    predictions = prefetch_predictions(days, train_days=1, hp=TINY, top_k=1)
    assert np.mean(predictions.keys[:-1, 0] == np.concatenate(days[1:])[1:]) > 0.8


def test_a_key_reached_by_its_class_and_a_delta_is_listed_once_with_both_probabilities():
    model = NextKeyModel(None, np.array([5, 7]), np.array([1, 2]), 1, 2, 0, 0.0, False, TINY)
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]]))  # keys 5, 7; deltas +1, +2; OOV
    keys, probs = model.top_keys(logits, np.array([6]), 10)
    assert keys.tolist() == [[7, 8, 5, 7]]  # 7 by its class and by +1, 8 by +2; the repeat of 7 is last
    np.testing.assert_allclose(probs, [[0.5, 0.15, 0.1, 0.0]])
    # 6 -> 7: key 7 and +1; 7 -> 9: +2 alone; 9 -> 12: neither (OOV); 12 -> 5: key 5 alone (-1: no class).
    key_targets, delta_targets = model.targets_of(np.array([6, 7, 9, 12, 5]))
    assert key_targets.tolist() == [1, -1, 4, 0] and delta_targets.tolist() == [2, 3, -1, -1]
    key_codes, delta_codes = model.inputs_of(np.array([6, 7, 9]))
    assert key_codes.tolist() == [2, 1, 2] and delta_codes.tolist() == [2, 0, 1]  # 2: OOV key, other delta


def test_deltas_are_learned_even_when_the_vocabulary_holds_every_training_key():
    """Scans of 5 within keys 0..99, then at new addresses: every training key is in the vocabulary, yet the
    +1 delta class is trained too (the loss is the next key's probability through both classes)."""
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 95, size=300)[:, None] + np.arange(5)).ravel().astype(np.int64)
    later = (10**7 + rng.integers(0, 10**6, size=300)[:, None] + np.arange(5)).ravel().astype(np.int64)
    hp = NextKeyHyperParams(**{**TINY.__dict__, "vocab_size": 200})
    result = next_key_accuracy([train, later], train_days=1, hp=hp)
    assert result["next_key_vocab"] == 99 and result["next_key_oov_share"] == 1.0
    assert result["next_key_top1"]["lstm"] == pytest.approx(0.8, abs=0.02)  # the 4 of 5 after a run's first key


def test_the_loss_is_the_next_keys_probability_through_both_classes():
    from precompute_assets.ml.next_key import _next_key_loss

    logits = torch.tensor([[[0.5, 1.0, -0.3, 2.0, 0.1], [0.2, 0.0, 1.5, -1.0, 0.3]]])
    key_targets, delta_targets = torch.tensor([[1, -1]]), torch.tensor([[3, 2]])
    p = torch.softmax(logits, dim=-1)[0]
    expected = -(torch.log(p[0, 1] + p[0, 3]) + torch.log(p[1, 2])) / 2
    assert float(_next_key_loss(logits, key_targets, delta_targets)) == pytest.approx(float(expected), rel=1e-6)


def test_unsigned_and_mixed_keys_are_read_as_the_trace_reader_reads_them():
    # uint64 addresses beyond int64 keep their bits: the same accuracies as their int64 view, exact keys.
    runs = (np.arange(400, dtype=np.uint64) // 5) * np.uint64(1000) + np.arange(400, dtype=np.uint64) % 5
    addresses = np.uint64(2**63) + runs
    unsigned = next_key_accuracy([addresses[:200], addresses[200:]], train_days=1, hp=TINY)
    bits = next_key_accuracy([addresses[:200].view(np.int64), addresses[200:].view(np.int64)], train_days=1, hp=TINY)
    for result in (unsigned, bits):
        del result["next_key_lstm_seconds"]
    assert unsigned == bits and unsigned["next_key_top1"]["markov1_delta"] == pytest.approx(0.8)
    predictions = prefetch_predictions([addresses[:200], addresses[200:]], train_days=1, hp=TINY, top_k=1)
    assert predictions.keys.dtype == np.int64
    assert np.mean(predictions.keys[:-1, 0] == addresses[201:].view(np.int64)) > 0.7
    # Integer training days then string keys: keys are objects throughout, with no deltas.
    mixed = [np.arange(100, dtype=np.int64) % 7, objects("a", "b", "c", "a")]
    result = next_key_accuracy(mixed, train_days=1, hp=TINY)
    assert result["next_key_delta_vocab"] == 0 and set(result["next_key_top1"]) == set(PREDICTORS)
    assert markov1_predictions(mixed, train_days=1).keys.dtype == object
    model = train_next_key(mixed, train_days=1, hp=TINY)
    entry = learned_prefetch(mixed, top_n=0, capacity=3, model=model, train_days=1, hp=TINY)
    assert entry["markov1_prefetch_over"] == "keys"


def test_string_keys_get_no_delta_vocabulary_and_deltas_need_two_sightings():
    result = next_key_accuracy([objects(*"abcabcab"), objects(*"cab")], train_days=1, hp=TINY)
    assert result["next_key_delta_vocab"] == 0 and set(result["next_key_top1"]) == set(PREDICTORS)
    model = train_next_key([np.array([1, 2, 3, 10, 20, 21, 22]), np.array([1])], train_days=1, hp=TINY)
    assert model.deltas.tolist() == [1]  # +1 four times; +7, +10, -? once each


def brute_force_markov(train: list, later: list, k: int = 10) -> tuple[float, float]:
    counts = Counter(train)
    popular = sorted(counts, key=lambda key: (-counts[key], key))
    successors: dict = {}
    for before, after in zip(train, train[1:], strict=False):
        successors.setdefault(before, Counter())[after] += 1
    hits1 = hits10 = 0
    previous = train[-1]
    for key in later:
        after = successors.get(previous, Counter())
        ranked = sorted(after, key=lambda s: (-after[s], popular.index(s)))[:k]
        ranked += [p for p in popular if p not in ranked][: k - len(ranked)]
        hits1 += ranked[0] == key
        hits10 += key in ranked
        previous = key
    return hits1 / len(later), hits10 / len(later)


@pytest.mark.parametrize("seed", [0, 1])
def test_markov1_and_most_popular_match_a_brute_force(seed):
    rng = np.random.default_rng(seed)
    # Few keys, so successor counts tie often; a rare key gets fewer than 10 successors; some keys are new later.
    keys = [f"k{i:02d}" for i in range(25)]
    stream = [keys[i] for i in rng.integers(0, 25, size=900)] + ["rare", "k00"]
    later = [keys[i] for i in rng.integers(0, 25, size=300)] + ["unseen", "rare", "k01", "unseen"]
    days = [objects(*stream[:450]), objects(*stream[450:]), objects(*later)]
    hp = NextKeyHyperParams(
        vocab_size=8, embedding_dim=4, hidden_size=4, seq_len=8, batch_size=4, max_epochs=1, min_steps=1
    )
    result = next_key_accuracy(days, train_days=2, hp=hp)
    top1, top10 = brute_force_markov(stream, later)
    assert result["next_key_top1"]["markov1"] == pytest.approx(top1)
    assert result["next_key_top10"]["markov1"] == pytest.approx(top10)
    counts = Counter(stream)
    popular = sorted(counts, key=lambda key: (-counts[key], key))[:10]
    assert result["next_key_top1"]["most_popular"] == pytest.approx(np.mean([key == popular[0] for key in later]))
    assert result["next_key_top10"]["most_popular"] == pytest.approx(np.mean([key in popular for key in later]))


def test_markov1_delta_is_markov1_over_deltas():
    """Markov-1 over deltas equals the key Markov-1 brute force run on the deltas (module doc)."""
    rng = np.random.default_rng(4)
    train = np.cumsum(rng.choice([1, 2, 3, -5, 40], size=600)).astype(np.int64)
    later = train[-1] + np.cumsum(rng.choice([1, 2, 3, -5, 41], size=200)).astype(np.int64)  # +41: a new delta
    result = next_key_accuracy([train, later], train_days=1, hp=TINY)
    moves = np.diff(np.concatenate([train, later])).tolist()
    top1, top10 = brute_force_markov(moves[: len(train) - 1], moves[len(train) - 1 :])
    assert result["next_key_top1"]["markov1_delta"] == pytest.approx(top1)
    assert result["next_key_top10"]["markov1_delta"] == pytest.approx(top10)


def brute_force_markov_rows(fitted: list, states: list, k: int) -> list[list[tuple]]:
    """Per state, its k most frequent training successors (ties: the more popular symbol, then the smaller) with
    count / count of the state; popular symbols fill the row at probability 0, or at their share of the training
    symbols when the state has no successor."""
    counts = Counter(fitted)
    popular = sorted(counts, key=lambda symbol: (-counts[symbol], symbol))
    after: dict = {}
    for before, nxt in zip(fitted, fitted[1:], strict=False):
        after.setdefault(before, Counter())[nxt] += 1
    rows = []
    for state in states:
        seen = after.get(state, Counter())
        total = sum(seen.values())
        ranked = sorted(seen, key=lambda symbol: (-seen[symbol], popular.index(symbol)))[:k]
        row = [(symbol, seen[symbol] / total) for symbol in ranked]
        share = (lambda symbol: 0.0) if total else (lambda symbol: counts[symbol] / len(fitted))
        row += [(symbol, share(symbol)) for symbol in popular if symbol not in ranked][: k - len(row)]
        rows.append(row)
    return rows


@pytest.mark.parametrize("integer", [False, True])
def test_markov1_predictions_match_a_brute_force(integer):
    rng = np.random.default_rng(7)
    train = rng.choice([3, 4, 7, 9, 30], size=300).cumsum() if integer else rng.choice(list("abcdefg"), size=300)
    later = (train[-1] + rng.choice([3, 4, 5, 9], size=80).cumsum()) if integer else rng.choice(list("abcxy"), 80)
    # New symbols later (5, x, y): states never seen in training back off to the training shares.
    train, later = (np.asarray(part, dtype=np.int64 if integer else object) for part in (train, later))
    got = markov1_predictions([train, later], train_days=1, top_k=3)
    stream = np.concatenate([train, later]).tolist()
    if integer:  # over deltas: the state of a request is the delta that led to it
        moves = np.diff(stream).tolist()
        rows = brute_force_markov_rows(moves[: len(train) - 1], moves[len(train) - 1 :], 3)
        expected = [[current + move for move, _ in row] for current, row in zip(later.tolist(), rows, strict=True)]
    else:
        rows = brute_force_markov_rows(train.tolist(), later.tolist(), 3)
        expected = [[symbol for symbol, _ in row] for row in rows]
    sure = [[probability for _, probability in row] for row in rows]
    np.testing.assert_allclose(got.confidence, sure)
    assert got.keys.tolist() == expected
    assert got.first_day == 1 and 0 < got.confidence.max() <= 1


def test_markov1_prefetch_is_reported_beside_the_lstms():
    days = scan_days(days=3, per_day=1200)
    model = train_next_key(days, train_days=1, hp=TINY)
    entry = learned_prefetch(days, top_n=0, capacity=50, model=model, train_days=1, threshold=0.5, hp=TINY)
    assert entry["markov1_prefetch_over"] == "deltas"
    # Scans through 50 slots: LRU never hits; prefetching the next address does, for the LSTM and Markov-1 alike
    # (after a jump never seen in training, Markov-1 backs off to +1, 7 of 8 training deltas).
    assert entry["hit_rate_lru_same_days"] == entry["hit_rate_s3fifo_same_days"] == 0.0
    assert entry["hit_rate_arc_same_days"] == 0.0
    assert entry["hit_rate_markov1_prefetch"] > 0.8 and entry["markov1_prefetched"] > 0
    assert entry["hit_rate"] > 0.8
    with pytest.raises(ValueError, match="top_k must be a whole number >= 1, got 0"):
        markov1_predictions(days, train_days=1, top_k=0)


def test_evaluation_is_the_first_requests_of_the_later_days():
    days = cyclic_days(days=4, per_day=500)
    hp = NextKeyHyperParams(**{**TINY.__dict__, "max_eval_requests": 700, "max_epochs": 2})
    bounded = next_key_accuracy(days, train_days=2, hp=hp)
    later = np.concatenate(days[2:])
    cut = next_key_accuracy([*days[:2], later[:700]], train_days=2, hp=hp)
    assert bounded["next_key_eval_requests"] == cut["next_key_eval_requests"] == 700
    for what in ("next_key_top1", "next_key_top10"):
        assert bounded[what] == cut[what]  # the same model (same training days and seed), the same 700 targets


def test_deterministic_under_seed_and_chunking():
    days = cyclic_days(days=3, per_day=800)
    first = next_key_accuracy(days, train_days=1, hp=TINY)
    again = next_key_accuracy(days, train_days=1, hp=TINY)
    for result in (first, again):
        del result["next_key_lstm_seconds"]
    assert first == again
    model = train_next_key(days, train_days=1, hp=TINY)
    whole = prefetch_predictions(days, train_days=1, model=model)
    small = NextKeyHyperParams(**{**TINY.__dict__, "chunk": 7})
    model.hp = small  # inference only: the carried state makes chunks of 7 steps the same as one chunk
    chunked = prefetch_predictions(days, train_days=1, model=model)
    assert np.array_equal(whole.keys, chunked.keys)
    np.testing.assert_allclose(whole.confidence, chunked.confidence, rtol=1e-5)


class SteppingClock:
    """A ``time`` module whose ``perf_counter`` moves ``seconds`` on at every reading: the training loop reads it
    once a step, so each step takes that long, as on a machine that much slower or busier."""

    def __init__(self, seconds: float) -> None:
        self.now, self.seconds = 0.0, seconds

    def perf_counter(self) -> float:
        self.now += self.seconds
        return self.now


def learned_on_a_clock(monkeypatch, days: list[np.ndarray], hp: NextKeyHyperParams, seconds: float):
    """The next-key model trained while each step takes ``seconds``, its accuracy and its prefetch entry."""
    from precompute_assets.ml import next_key

    monkeypatch.setattr(next_key, "time", SteppingClock(seconds))
    model = train_next_key(days, train_days=2, hp=hp)
    accuracy = next_key_accuracy(days, train_days=2, model=model)
    del accuracy["next_key_lstm_seconds"]
    return model, accuracy, learned_prefetch(days, top_n=2, capacity=10, model=model, train_days=2, threshold=0.3)


def test_training_is_bounded_by_steps_so_a_slower_machine_learns_the_same_net(monkeypatch):
    """The prefetch hit rate moved between runs (0.4239, 0.4102, 0.4395) as training stopped on a wall-clock budget
    wherever the machine had got to: a budget of steps trains the same net on a fast and a slow machine alike, and
    the default time bound is a safety stop beyond a slow step's (1 s) budget of steps."""
    days = cyclic_days(days=4, per_day=800)
    hp = NextKeyHyperParams(**{**TINY.__dict__, "max_seconds": NextKeyHyperParams().max_seconds, "max_steps": 100})
    fast_model, fast, fast_prefetch = learned_on_a_clock(monkeypatch, days, hp, 0.001)
    slow_model, slow, slow_prefetch = learned_on_a_clock(monkeypatch, days, hp, 1.0)
    assert fast_model.steps == slow_model.steps == 100
    assert not (fast_model.stopped_by_time or slow_model.stopped_by_time)
    assert fast["next_key_top1"] == slow["next_key_top1"] and fast["next_key_top10"] == slow["next_key_top10"]
    assert fast == slow and fast_prefetch == slow_prefetch


def test_the_time_safety_stop_is_reported_when_it_fires(monkeypatch):
    days = cyclic_days(days=4, per_day=800)
    hp = NextKeyHyperParams(**{**TINY.__dict__, "max_seconds": 10.0, "max_steps": 100})
    model, accuracy, _ = learned_on_a_clock(monkeypatch, days, hp, 1.0)  # 10 of the 100 steps in 10 s
    assert model.stopped_by_time and model.steps == accuracy["next_key_lstm_steps"] == 10
    assert accuracy["next_key_notes"][-1] == (
        "lstm training stopped by its max_seconds safety stop (10 s) after 10 of 100 steps, in epoch 3: a slower "
        "machine than the step budget was sized for, so another run may give other results"
    )


def test_replay_cli_reports_the_time_safety_stop_of_next_key_and_prefetch(tmp_path, capsys, monkeypatch):
    import contextlib
    import json
    from concurrent.futures import ThreadPoolExecutor

    from precompute_assets.ml import next_key
    from precompute_assets.tools import cli

    @contextlib.contextmanager
    def in_process(wanted: bool):
        with ThreadPoolExecutor(1) as pool:  # the training in this process, on the clock below
            yield pool

    monkeypatch.setattr(cli, "_replay_pool", in_process)
    monkeypatch.setattr(next_key, "time", SteppingClock(1000.0))  # the first step outlasts the safety stop
    trace = write_trace(tmp_path / "cycle.txt", cyclic_days(days=4, per_day=200))
    args = ["replay", "--trace", trace, "--days", "4", "--top-n", "2", "--capacity", "10"]
    assert cli.main([*args, "--next-key", "--strategy", "prefetch"]) == 0
    out = json.loads(capsys.readouterr().out)
    stopped = "lstm training stopped by its max_seconds safety stop (180 s) after 1 of 300 steps, in epoch 1"
    assert out["next_key_lstm_steps"] == 1 and out["next_key_notes"][-1].startswith(stopped)
    assert out["strategy_notes"][-1].startswith(f"prefetch: {stopped}")


def test_predictions_keep_the_most_likely_keys_of_each_request_best_first():
    days = cyclic_days(days=3, per_day=300)
    model = train_next_key(days, train_days=1, hp=TINY)
    top3 = prefetch_predictions(days, train_days=1, model=model, top_k=3)
    assert top3.keys.shape == top3.confidence.shape == (600, 3)
    assert np.all(np.diff(top3.confidence, axis=1) <= 0) and np.all(top3.confidence.sum(axis=1) <= 1 + 1e-9)
    assert np.all(top3.keys[:, 0] != top3.keys[:, 1])  # distinct keys in a row
    top1 = prefetch_predictions(days, train_days=1, model=model, top_k=1)
    assert np.array_equal(top1.keys[:, 0], top3.keys[:, 0])
    np.testing.assert_allclose(top1.confidence[:, 0], top3.confidence[:, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="top_k must be a whole number >= 1, got 0"):
        prefetch_predictions(days, train_days=1, model=model, top_k=0)


def test_predictions_are_causal():
    days = cyclic_days(days=3, per_day=600)
    model = train_next_key(days, train_days=1, hp=TINY)
    base = prefetch_predictions(days, train_days=1, model=model)
    changed = [day.copy() for day in days]
    changed[2][300:] = 999  # rewrite the future from request 300 of day 2
    other = prefetch_predictions(changed, train_days=1, model=model)
    before = len(days[1]) + 300  # predictions made after requests before the change
    assert np.array_equal(base.keys[:before], other.keys[:before])
    np.testing.assert_allclose(base.confidence[:before], other.confidence[:before], rtol=1e-6)
    assert len(base.keys) == len(base.confidence) == len(days[1]) + len(days[2]) and base.first_day == 1


@pytest.mark.parametrize(
    ("maker", "top_n", "capacity", "warmup"),
    [(cyclic_days, 2, 10, 1), (cyclic_days, 0, 25, 2), (zipf_days, 20, 40, 1), (zipf_days, 30, 30, 3)],
)
def test_never_prefetching_is_replays_ours(maker, top_n, capacity, warmup):
    days = maker()
    if maker is zipf_days:
        days = [np.array([f"z{key}" for key in day], dtype=object) for day in days]  # string keys too
    predictions = prefetch_predictions(days, train_days=1, hp=TINY)
    result = prefetch_replay(
        days, top_n=top_n, capacity=capacity, warmup_days=warmup, predictions=predictions, threshold=1.01
    )
    expected = replay(days, top_n=top_n, capacity=capacity, warmup_days=warmup)["hit_rate_ours"]
    assert result["hit_rate"] == expected
    assert result["prefetched"] == result["prefetch_used"] == 0


def test_prefetch_raises_the_hit_rate_of_a_cycle_at_small_capacity():
    days = cyclic_days()
    predictions = prefetch_predictions(days, train_days=1, hp=TINY)
    ours = replay(days, top_n=2, capacity=10, warmup_days=1)["hit_rate_ours"]
    result = prefetch_replay(days, top_n=2, capacity=10, warmup_days=1, predictions=predictions, threshold=0.5)
    assert ours < 0.1  # a 40-key cycle through 8 LRU slots: LRU always evicts the key needed next
    assert result["hit_rate"] > ours + 0.5
    assert 0 < result["prefetch_used"] <= result["prefetched"]
    assert result["threshold"] == 0.5 and result["top_n"] == 2 and result["capacity"] == 10


def test_prefetch_replay_counts_by_hand():
    days = [objects("a", "b"), objects("a", "b", "a", "b")]
    predictions = NextKeyPredictions(first_day=1, keys=objects("b", "a", "b", "a"), confidence=np.ones(4))
    result = prefetch_replay(days, top_n=0, capacity=1, warmup_days=1, predictions=predictions, threshold=0.5)
    # Day 1: "a" misses (the cache holds "b") and then "b" is prefetched over it; every later request is a hit.
    assert result["hit_rate"] == 0.75
    assert result["prefetched"] == 4 and result["prefetch_used"] == 3
    # A prediction below the threshold, or a key precomputed that day, is not prefetched.
    low = NextKeyPredictions(first_day=1, keys=predictions.keys, confidence=np.array([0.4, 1.0, 1.0, 1.0]))
    result = prefetch_replay(days, top_n=0, capacity=1, warmup_days=1, predictions=low, threshold=0.5)
    # "a" misses, "b" misses and "a" is prefetched over it, then both hit: 2 of 4, 3 prefetches, 2 of them used.
    assert result["hit_rate"] == 0.5 and result["prefetched"] == 3 and result["prefetch_used"] == 2
    # Day 1 precomputes "a" (day 0's top-1, tie by key) and the LRU already holds "b": nothing to prefetch.
    result = prefetch_replay(days, top_n=1, capacity=2, warmup_days=1, predictions=predictions, threshold=0.5)
    assert result["prefetched"] == 0 and result["hit_rate"] == 1.0


def test_bad_inputs_are_refused_with_clear_messages():
    days = cyclic_days(days=3, per_day=100)
    with pytest.raises(ValueError, match="train_days must be at least 1 and less than the 3 days, got 0"):
        next_key_accuracy(days, train_days=0, hp=TINY)
    with pytest.raises(ValueError, match="train_days must be at least 1 and less than the 3 days, got 3"):
        next_key_accuracy(days, train_days=3, hp=TINY)
    empty = np.array([], dtype=np.int64)
    with pytest.raises(ValueError, match=r"the training days 0\.\.1 hold no requests"):
        next_key_accuracy([empty, empty, days[2]], train_days=2, hp=TINY)
    with pytest.raises(ValueError, match=r"the evaluation days 1\.\.2 hold no requests"):
        prefetch_predictions([days[0], empty, empty], train_days=1, hp=TINY)
    for bad in ({"vocab_size": 0}, {"seq_len": 0}, {"max_eval_requests": -1}, {"batch_size": 1.5}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a whole number >= 1"):
            NextKeyHyperParams(**bad)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="delta_vocab_size must be a whole number >= 0"):
            NextKeyHyperParams(delta_vocab_size=bad)
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="loss_share must be in"):
            NextKeyHyperParams(loss_share=bad)
    for bad in ({"max_seconds": 0}, {"learning_rate": float("nan")}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be positive"):
            NextKeyHyperParams(**bad)
    model = train_next_key(days, train_days=1, hp=TINY)
    with pytest.raises(ValueError, match="model was trained on another split"):
        next_key_accuracy(days, train_days=2, model=model)
    predictions = prefetch_predictions(days, train_days=2, hp=TINY)
    with pytest.raises(ValueError, match=r"warmup_days \(1\) must be >= the first predicted day \(2\)"):
        prefetch_replay(days, top_n=1, capacity=5, warmup_days=1, predictions=predictions)
    with pytest.raises(ValueError, match=r"predictions cover 100 requests, not the 200 requests of days 2\.\.3"):
        prefetch_replay(days[:1] + days[1:] + days[2:], top_n=1, capacity=5, warmup_days=2, predictions=predictions)
    with pytest.raises(ValueError, match=r"top_n \(6\) cannot exceed capacity \(5\)"):
        prefetch_replay(days, top_n=6, capacity=5, warmup_days=2, predictions=predictions)
    with pytest.raises(ValueError, match="warmup_days must be at least 1 and less than the 3 days, got 3"):
        prefetch_replay(days, top_n=1, capacity=5, warmup_days=3, predictions=predictions)


def brute_force_ours_with_prefetch(days, chosen, slots, guesses, warmup) -> int:
    """An independent LRU as a list, most recent last: each insertion, then a trim to ``slots``; ``guesses`` holds
    per request the keys to prefetch after it, in the order they go in."""
    cache: list = []
    hits = 0
    for d, day in enumerate(days):
        for key, guess_list in zip(day.tolist(), guesses[d], strict=True):
            if d >= warmup:
                hits += key in chosen[d] or key in cache
            if key not in chosen[d]:
                if key in cache:
                    cache.remove(key)
                cache.append(key)
                del cache[: max(0, len(cache) - slots)]
            for guess in guess_list:  # after the request
                if guess not in chosen[d] and guess not in cache:
                    cache.append(guess)
                    del cache[: max(0, len(cache) - slots)]
    return hits


@pytest.mark.parametrize(
    ("top_n", "capacity", "warmup", "per_request"),
    [(0, 3, 1, None), (3, 8, 2, None), (5, 5, 1, None), (2, 4, 1, None), (0, 3, 1, 3), (3, 8, 2, 3), (2, 4, 1, 2)],
)
def test_prefetch_replay_matches_a_brute_force_with_random_predictions(top_n, capacity, warmup, per_request):
    """One guess per request (1-d), or rows of ``per_request`` guesses, most likely first (2-d)."""
    rng = np.random.default_rng(top_n + capacity)
    days = [rng.integers(0, 15, size=size).astype(np.int64) for size in (60, 80, 70)]
    shape = 150 if per_request is None else (150, per_request)
    keys = rng.integers(0, 18, size=shape).astype(np.int64)  # keys 15..17 are never requested, but take slots
    confidence = rng.random(shape)
    predictions = NextKeyPredictions(first_day=1, keys=keys, confidence=confidence)
    result = prefetch_replay(
        days, top_n=top_n, capacity=capacity, warmup_days=warmup, predictions=predictions, threshold=0.4
    )
    rows = zip(keys.reshape(150, -1), confidence.reshape(150, -1), strict=True)
    # The less likely go in first, so the most likely ends most recent.
    go = [[int(k) for k, c in zip(row[::-1], sure[::-1], strict=True) if c >= 0.4] for row, sure in rows]
    guesses = [[[]] * 60, go[:80], go[80:]]
    chosen = _precomputed_sets(days, top_n=top_n, half_life_days=2.0)
    hits = brute_force_ours_with_prefetch(days, chosen, capacity - top_n, guesses, warmup)
    assert result["hit_rate"] == hits / sum(len(day) for day in days[warmup:])


def random_predictions(rng, first_day: int, requests: int, per_request: int = 2) -> NextKeyPredictions:
    keys = rng.integers(0, 18, size=(requests, per_request)).astype(np.int64)  # 15..17 never requested
    return NextKeyPredictions(first_day=first_day, keys=keys, confidence=rng.random((requests, per_request)))


@pytest.mark.parametrize(("top_n", "capacity", "warmup"), [(0, 3, 1), (2, 6, 1), (1, 4, 2), (0, 5, 3)])
def test_chosen_prefetch_matches_a_brute_force_that_picks_from_earlier_days_only(top_n, capacity, warmup):
    rng = np.random.default_rng(10 * top_n + capacity + warmup)
    sizes = (50, 70, 60, 80, 40)
    days = [rng.integers(0, 15, size=size).astype(np.int64) for size in sizes]
    predicted = sum(sizes[1:])
    candidates = {"a": random_predictions(rng, 1, predicted), "b": random_predictions(rng, 1, predicted)}
    result = chosen_prefetch(
        days, candidates=candidates, top_n=top_n, capacity=capacity, warmup_days=warmup, threshold=0.3
    )
    chosen = _precomputed_sets(days, top_n=top_n, half_life_days=2.0)

    def guesses_of(predictions):  # per day, per request: the keys to prefetch, the least likely first
        go = [
            [int(k) for k, c in zip(row[::-1], sure[::-1], strict=True) if c >= 0.3]
            for row, sure in zip(predictions.keys, predictions.confidence, strict=True)
        ]
        bounds = np.cumsum([0, *sizes[1:]])
        return [[[]] * sizes[0]] + [go[bounds[i] : bounds[i + 1]] for i in range(len(sizes) - 1)]

    options = {"none": [[[]] * size for size in sizes], **{name: guesses_of(p) for name, p in candidates.items()}}
    per_day = {  # each option's hits on each day alone, from brute-force replays of days 0..d
        name: [
            brute_force_ours_with_prefetch(days[: d + 1], chosen, capacity - top_n, guesses, d)
            for d in range(len(days))
        ]
        for name, guesses in options.items()
    }
    names = list(options)
    picks = ["none"] * len(days)
    for d in range(warmup + 1, len(days)):
        picks[d] = max(names, key=lambda name: (sum(per_day[name][warmup:d]), -names.index(name)))
    mixed = [options[picks[d]][d] for d in range(len(days))]
    hits = brute_force_ours_with_prefetch(days, chosen, capacity - top_n, mixed, warmup)
    counted = sum(sizes[warmup:])
    assert result["chosen"] == picks[warmup:]
    assert result["hit_rate"] == hits / counted
    for name in candidates:
        assert result["candidates"][name]["hit_rate"] == sum(per_day[name][warmup:]) / counted


def test_chosen_prefetch_drops_a_predictor_that_loses_and_keeps_one_that_wins():
    def junk_for(days):  # a guess after every request, each of a new key never requested: each costs a slot
        predicted = sum(len(day) for day in days[1:])
        return NextKeyPredictions(1, -1 - np.arange(predicted, dtype=np.int64), np.ones(predicted))

    popular = zipf_days(days=5, per_day=600)
    junk = junk_for(popular)
    result = chosen_prefetch(popular, candidates={"junk": junk}, top_n=0, capacity=20, warmup_days=1)
    nothing = prefetch_replay(popular, top_n=0, capacity=20, warmup_days=1, predictions=junk, threshold=1.01)
    assert result["chosen"] == ["none"] * 4 and result["prefetched"] == 0
    assert result["candidates"]["junk"]["hit_rate"] < nothing["hit_rate"] - 0.05
    assert result["hit_rate"] == nothing["hit_rate"]  # LRU's hits on Zipf requests

    cycle = cyclic_days(days=5, per_day=600)
    after = np.concatenate(cycle[1:])[1:]  # the key that really comes next; the last request's guess is its own key
    oracle = NextKeyPredictions(1, np.append(after, cycle[-1][-1]), np.ones(len(after) + 1))
    result = chosen_prefetch(
        cycle, candidates={"junk": junk_for(cycle), "oracle": oracle}, top_n=0, capacity=8, warmup_days=1
    )
    assert result["chosen"] == ["none", "oracle", "oracle", "oracle"]
    # A 40-key cycle through 8 slots: LRU never hits, prefetching the next key does from day 2 on.
    assert result["hit_rate"] > 0.6 and result["candidates"]["oracle"]["hit_rate"] > result["hit_rate"]
    with pytest.raises(ValueError, match="a candidate cannot be named 'none'"):
        chosen_prefetch(cycle, candidates={"none": oracle}, top_n=0, capacity=8, warmup_days=1)
    late = NextKeyPredictions(2, oracle.keys[len(cycle[1]) :], oracle.confidence[len(cycle[1]) :])
    with pytest.raises(ValueError, match=r"the predictions start on different days: \[1, 2\]"):
        chosen_prefetch(cycle, candidates={"oracle": oracle, "late": late}, top_n=0, capacity=8, warmup_days=2)


def cycle_of(sizes, cycle=40) -> list[np.ndarray]:
    """Days of one 40-key cycle walked in order, of the given sizes."""
    return np.split((np.arange(sum(sizes)) % cycle).astype(np.int64), np.cumsum(sizes)[:-1])


def test_chosen_prefetch_switches_candidates_as_one_replay_of_the_mixed_predictions():
    sizes = (400, 200, 400, 400)
    days = cycle_of(sizes)
    later = np.concatenate(days[1:])
    after = np.append(later[1:], later[0])  # the key that really comes next
    bounds = np.cumsum([0, *sizes[1:]])  # rows of days 1, 2, 3
    day = np.repeat(np.arange(1, 4), sizes[1:])
    keys = np.stack([after, np.full(len(after), 999)], axis=1)  # 999 is never requested
    a_sure = np.stack([(day == 1).astype(float), np.zeros(len(after))], axis=1)
    a_sure[bounds[2] - 1, 1] = 1.0  # a's last request of day 2 also prefetches 999
    b_sure = np.stack([(day >= 2).astype(float), np.zeros(len(after))], axis=1)
    b_sure[bounds[2], 1] = 1.0  # b's first request of day 3 guesses 999 too: still cached, no new prefetch
    candidates = {"a": NextKeyPredictions(1, keys, a_sure), "b": NextKeyPredictions(1, keys, b_sure)}
    replayed = {"top_n": 0, "capacity": 8, "warmup_days": 1}
    result = chosen_prefetch(days, candidates=candidates, **replayed)
    assert result["chosen"] == ["none", "a", "b"]  # a won day 1, b day 2 (twice a's requests)
    sure = np.zeros_like(a_sure)  # the same run as one prediction: day 1 nothing, day 2 a's rows, day 3 b's
    sure[bounds[1] : bounds[2]] = a_sure[bounds[1] : bounds[2]]
    sure[bounds[2] :] = b_sure[bounds[2] :]
    mixed = prefetch_replay(days, predictions=NextKeyPredictions(1, keys, sure), **replayed)
    assert (result["hit_rate"], result["prefetched"]) == (mixed["hit_rate"], mixed["prefetched"])
    for name, given in candidates.items():
        alone = prefetch_replay(days, predictions=given, **replayed)
        assert result["candidates"][name] == {k: alone[k] for k in ("hit_rate", "prefetched", "prefetch_used")}


def test_chosen_prefetch_ties_go_to_none_then_the_order_given():
    days = cycle_of((400, 400, 400, 400))
    later = np.concatenate(days[1:])
    good = NextKeyPredictions(1, np.append(later[1:], 0), np.ones(len(later)))
    silent = NextKeyPredictions(1, good.keys, np.zeros(len(later)))
    replayed = {"top_n": 0, "capacity": 8, "warmup_days": 1}
    assert chosen_prefetch(days, candidates={"a": good, "b": good}, **replayed)["chosen"] == ["none", "a", "a"]
    assert chosen_prefetch(days, candidates={"b": good, "a": good}, **replayed)["chosen"] == ["none", "b", "b"]
    assert chosen_prefetch(days, candidates={"s": silent}, **replayed)["chosen"] == ["none", "none", "none"]


def test_chosen_prefetch_scores_each_candidate_in_its_own_key_type():
    """Pooled, int64 and uint64 guesses would become floats (keys near 2^60 merge) and integers beside strings
    strings; uint64 guesses are read as the trace's int64 bits."""
    big = 2**60
    days = [np.arange(big, big + 40, dtype=np.int64)[np.arange(n) % 40] for n in (400, 400, 400)]
    later = np.concatenate(days[1:])
    after = np.append(later[1:], later[0])
    exact = NextKeyPredictions(1, after, np.ones(len(after)))
    replayed = {"top_n": 0, "capacity": 8, "warmup_days": 1}
    alone = prefetch_replay(days, predictions=exact, **replayed)["hit_rate"]
    assert alone > 0.45  # day 2 of the two counted ones prefetches every next key
    others = {
        "unsigned": NextKeyPredictions(1, (after + 1).astype(np.uint64), np.ones(len(after))),
        "strings": NextKeyPredictions(1, after.astype(str), np.ones(len(after))),
        "none_left": NextKeyPredictions(1, np.empty((len(after), 0)), np.empty((len(after), 0))),
    }
    for name, other in others.items():
        result = chosen_prefetch(days, candidates={name: other, "exact": exact}, **replayed)
        assert result["candidates"]["exact"]["hit_rate"] == alone, name
    unsigned = NextKeyPredictions(1, after.astype(np.uint64), np.ones(len(after)))
    assert prefetch_replay(days, predictions=unsigned, **replayed)["hit_rate"] == alone


def test_chosen_prefetch_names_the_candidate_at_fault():
    days = cycle_of((100, 100, 100))
    short = NextKeyPredictions(1, np.zeros(150, dtype=np.int64), np.ones(150))
    with pytest.raises(ValueError, match="chosen_prefetch needs at least one candidate"):
        chosen_prefetch(days, candidates={}, top_n=0, capacity=8, warmup_days=1)
    with pytest.raises(ValueError, match=r"candidate 'short''s predictions cover 150 requests, not the 200"):
        chosen_prefetch(days, candidates={"short": short}, top_n=0, capacity=8, warmup_days=1)


def test_learned_prefetch_reports_each_replay_under_its_own_name():
    days = cyclic_days(days=4, per_day=400)
    model = train_next_key(days, train_days=2, hp=TINY)
    entry = learned_prefetch(days, top_n=3, capacity=10, model=model, train_days=2, threshold=0.5, hp=TINY)
    replayed = {"top_n": 3, "capacity": 10, "warmup_days": 2, "threshold": 0.5}
    lstm_predictions = prefetch_predictions(days, train_days=2, hp=TINY, model=model)
    markov_predictions = markov1_predictions(days, train_days=2)
    lstm = prefetch_replay(days, predictions=lstm_predictions, **replayed)
    markov = prefetch_replay(days, predictions=markov_predictions, **replayed)
    assert (lstm["hit_rate"], lstm["prefetched"]) != (markov["hit_rate"], markov["prefetched"])  # told apart
    chosen = chosen_prefetch(days, candidates={"markov1": markov_predictions, "lstm": lstm_predictions}, **replayed)
    assert {k: entry[k] for k in lstm} == lstm
    assert (entry["hit_rate_markov1_prefetch"], entry["markov1_prefetched"]) == (
        markov["hit_rate"],
        markov["prefetched"],
    )
    assert (entry["hit_rate_chosen_prefetch"], entry["chosen_prefetch"], entry["chosen_prefetched"]) == (
        chosen["hit_rate"],
        chosen["chosen"],
        chosen["prefetched"],
    )


def write_trace(path, days: list[np.ndarray]) -> str:
    path.write_text("\n".join(str(key) for key in np.concatenate(days)) + "\n")
    return str(path)


def test_replay_cli_reports_next_key_accuracy_and_merges_prefetch(tmp_path, capsys):
    import json

    from precompute_assets.tools.cli import main

    trace = write_trace(tmp_path / "cycle.txt", cyclic_days(days=4, per_day=800))
    args = ["replay", "--trace", trace, "--days", "4", "--top-n", "2", "--capacity", "10"]
    assert main([*args, "--next-key", "--strategy", "prefetch", "--prefetch-threshold", "0.3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["next_key_top1"]) == set(out["next_key_top10"]) == INTEGER_PREDICTORS
    assert out["next_key_top1"]["markov1"] > out["next_key_top1"]["most_popular"] + 0.3
    prefetch = out["strategies"]["prefetch"]
    assert prefetch["counted_from_day"] == 2 and prefetch["top_n"] == 2 and prefetch["threshold"] == 0.3
    assert prefetch["prefetched"] > 0 and prefetch["hit_rate"] > prefetch["hit_rate_ours_same_days"] + 0.3
    assert prefetch["markov1_prefetch_over"] == "deltas" and 0 <= prefetch["hit_rate_markov1_prefetch"] <= 1
    # The chooser prefetches nothing on the first counted day, then what did best on the days before.
    assert prefetch["chosen_prefetch"][0] == "none" and len(prefetch["chosen_prefetch"]) == 2
    assert prefetch["chosen_prefetch"][1] in {"none", "markov1", "lstm"} and prefetch["chosen_prefetched"] >= 0
    assert 0 <= prefetch["hit_rate_chosen_prefetch"] <= 1
    assert out["strategy_notes"] == [
        "prefetch: counted on days 2..3 only (its next-key model trains on the days before), the other strategies "
        "from day 1: compare its hit_rate with hit_rate_ours_same_days"
    ]
    # With a demand strategy too, both land in one strategies mapping; auto replays prefetch at top-N 0.
    assert main([*args[:-4], "--top-n", "auto", "--capacity", "10", "--strategy", "all"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["strategies"]) == {"frequency", "ewma", "seasonal", "lstm", "auto", "prefetch"}
    assert out["strategies"]["prefetch"]["top_n"] == 0 and "next_key_top1" not in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--next-key", "--train-days", "4"], "--train-days must be at least 1 and less than --days 4, got 4"),
        (["--strategy", "prefetch", "--train-days", "0"], "--train-days must be at least 1"),
        (["--next-key", "--prefetch-threshold", "nan"], "--prefetch-threshold must be a probability between 0 and 1"),
        (["--strategy", "prefetch", "--prefetch-threshold", "1e999"], "between 0 and 1, got inf"),
        (["--strategy", "prefetcher"], "unknown --strategy 'prefetcher'"),
    ],
)
def test_replay_cli_refuses_bad_learned_options_in_one_line(tmp_path, capsys, extra, message):
    from precompute_assets.tools.cli import main

    trace = write_trace(tmp_path / "cycle.txt", cyclic_days(days=4, per_day=200))
    assert main(["replay", "--trace", trace, "--days", "4", "--top-n", "2", "--capacity", "10", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
