"""Next-key prediction on a key trace, measured honestly, and a learned prefetch replayed against ``replay``'s ours.

``next_key_accuracy`` trains an LSTM language model over the key sequence of the earlier days (vocabulary: the
``vocab_size`` most frequent training keys plus one out-of-vocabulary class) and scores top-1 and top-10 next-key
accuracy on the later days beside baselines fitted on the same training days.

Integer keys (block addresses, ids handed out in order) also get a delta vocabulary, as learned prefetchers for
address streams use (Hashemi et al., "Learning Memory Access Patterns", 2018): the ``delta_vocab_size`` most
frequent differences "next key - current key" of the training days (each seen at least twice) are classes too, and
the net also reads the delta that led to the current key. A key's probability is the sum of its key class's and
that of the delta class that reaches it, and training maximises exactly that (the likelihood of the next key,
however many classes name it), so the net splits the mass between the two as the data pays: it can predict keys
it never saw (the next block of a scan) and still tell popular keys apart. The baselines:

- ``markov1``: the most frequent successors of the previous key in the training days (ties: the more frequent
  training key, then key order), the top-k filled up with ``most_popular`` keys when the previous key has fewer
  than k successors or was never seen;
- ``most_popular``: the 10 most frequent training keys (ties: key order), the same prediction at every position;
- ``markov1_delta`` (integer keys only): Markov-1 over deltas, the most frequent next deltas after the delta that
  led to the current key (the same ties and fill-up, among training deltas), added to the current key.

Honest scoring: every evaluated request counts in the denominator; a target outside the LSTM's vocabulary is a
miss for the LSTM unless a delta class reaches it, and the OOV class is never a prediction (top-k is taken
among real keys). The evaluated stream
is the first ``max_eval_requests`` requests of the later days, processed causally: the prediction of request i
sees only the requests before it (the training days included), the LSTM running over the stream in chunks with
its hidden state carried.

``prefetch_replay`` replays ``replay``'s ``ours`` (each day's frequency top-N precomputed plus a read-through LRU
of ``capacity - top_n`` keys) and, after each request of a day with predictions, inserts the model's predicted
next key into that LRU when its confidence reaches ``threshold``: prefetched keys take LRU slots, so what the
prefetch costs in evictions is measured together with what it gains. ``chosen_prefetch`` picks the predictor
(or none) day by day from the days before, so a learned one prefetches only where it wins.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .demand import torch_threads
from .replay import _as_codes, _precomputed_sets, arc_hits, int64_keys, replay, s3fifo_hits

TOP_K = 10  # the wider of the two accuracies; most_popular is this many keys
PREDICTORS = ("lstm", "markov1", "most_popular")  # and "markov1_delta" on integer keys
CANDIDATES = 16  # the LSTM's most likely key classes and delta classes whose keys are ranked (top_keys)


@dataclass(frozen=True)
class NextKeyHyperParams:
    """The next-key LSTM, its training budget and the evaluation bound.

    An epoch is one pass of truncated backpropagation through time over the training stream cut into
    ``batch_size`` contiguous streams, ``seq_len`` steps at a time, state carried. Each step's loss takes a random
    ``loss_share`` of its positions: the output layer over every class costs most of a step, so the net makes
    more passes in the same time. Training runs ``max_epochs / loss_share`` epochs (each target enters the loss
    about ``max_epochs`` times), or more on a short trace until ``min_steps`` steps are made, and never more than
    ``max_steps`` steps: a budget of work, not of time, so the same input, seed and threads train the same net
    however busy the machine (with the same torch build: CPU kernels may differ between processor families).
    ``max_steps`` is what a budget of 60 s reached on 2 shared cores. ``max_seconds`` is only a safety stop for a
    machine far slower than that: when it fires the run is no longer reproducible, and the results say so.
    """

    vocab_size: int = 5000  # most frequent training keys; one more class stands for every other key
    delta_vocab_size: int = 1000  # most frequent "next - current" differences of integer keys; 0: none
    embedding_dim: int = 32
    hidden_size: int = 64
    seq_len: int = 64
    batch_size: int = 64
    learning_rate: float = 0.005
    max_epochs: int = 5
    loss_share: float = 0.25  # of each step's positions, drawn at random, whose next key enters the loss
    min_steps: int = 300  # a short trace's few steps per epoch would leave the net untrained after max_epochs
    max_steps: int = 300  # ~140 ms of a core each at the default sizes: what 60 s reached on 2 shared cores
    max_seconds: float = 180.0  # a safety stop only, reported when it fires
    max_eval_requests: int = 300_000  # next_key_accuracy scores the first this many requests of the later days
    chunk: int = 4096  # steps per inference chunk (the hidden state is carried between chunks)
    seed: int = 0
    # torch CPU threads while training and predicting (None: torch's default), as ml.demand.
    threads: int | None = 1

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "embedding_dim",
            "hidden_size",
            "seq_len",
            "batch_size",
            "max_epochs",
            "min_steps",
            "max_steps",
            "max_eval_requests",
            "chunk",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if not 0 < self.loss_share <= 1:  # NaN fails too
            raise ValueError(f"loss_share must be in (0, 1], got {self.loss_share!r}")
        for name in ("learning_rate", "max_seconds"):
            if not getattr(self, name) > 0:  # NaN fails too
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        delta = self.delta_vocab_size
        if isinstance(delta, bool) or not isinstance(delta, int | np.integer) or delta < 0:
            raise ValueError(f"delta_vocab_size must be a whole number >= 0, got {delta!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads!r}")


DEFAULT_HYPER_PARAMS = NextKeyHyperParams()


class NextKeyLSTM(nn.Module):
    """Embeddings of the current key (vocabulary + OOV) and of the delta that led to it (delta vocabulary + other),
    summed; an LSTM; logits over the next key's classes (vocabulary, delta vocabulary, OOV)."""

    def __init__(self, keys: int, deltas: int, embedding_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(keys + 1, embedding_dim)
        self.embed_delta = nn.Embedding(deltas + 1, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, keys + deltas + 1)

    def encode(self, key_codes: torch.Tensor, delta_codes: torch.Tensor, state=None):
        """The LSTM's outputs and state over the inputs, before the head."""
        return self.lstm(self.embed(key_codes) + self.embed_delta(delta_codes), state)

    def forward(self, key_codes: torch.Tensor, delta_codes: torch.Tensor, state=None):
        out, state = self.encode(key_codes, delta_codes, state)
        return self.head(out), state


@dataclass
class NextKeyModel:
    """A trained next-key LSTM: ``vocab`` holds the key of each key class, ``deltas`` the difference of each delta
    class (int64; empty unless keys are integers). Output classes: keys, then deltas, then OOV."""

    net: NextKeyLSTM
    vocab: np.ndarray
    deltas: np.ndarray
    train_days: int
    train_requests: int
    epochs: int
    seconds: float
    stopped_by_time: bool
    hp: NextKeyHyperParams
    steps: int = 0

    def classes_of(self, keys: np.ndarray) -> np.ndarray:
        """The class of each key: its vocabulary index, or the OOV class ``len(vocab)``."""
        index = pd.Index(self.vocab).get_indexer(pd.Index(np.asarray(keys)))
        return np.where(index >= 0, index, len(self.vocab)).astype(np.int64)

    def inputs_of(self, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The net's inputs at each request of ``stream``: its key class, and the class of the delta from the
        request before (``len(deltas)``, "other", for the first request and for deltas outside the vocabulary)."""
        keys = self.classes_of(stream)
        other = len(self.deltas)
        moves = np.full(len(stream), other, dtype=np.int64)
        if other and len(stream) > 1:
            moves[1:] = self._delta_classes(np.diff(stream))
        return keys, moves

    def targets_of(self, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The output classes that name the key after each request but the last: its key class (-1: outside the
        vocabulary) and its delta class (-1: outside the delta vocabulary); the OOV class as the key class when
        neither names it."""
        vocab, other = len(self.vocab), len(self.deltas)
        keys = self.classes_of(stream[1:])
        moves = np.full(len(keys), -1, dtype=np.int64)
        if other and len(stream) > 1:
            moves = self._delta_classes(np.diff(stream))
            moves = np.where(moves < other, vocab + moves, -1)
        keys = np.where(keys < vocab, keys, np.where(moves < 0, vocab + other, -1))
        return keys, moves

    def _delta_classes(self, moves: np.ndarray) -> np.ndarray:
        index = pd.Index(self.deltas).get_indexer(pd.Index(moves))
        return np.where(index >= 0, index, len(self.deltas)).astype(np.int64)

    def top_keys(self, logits: torch.Tensor, current: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most likely real next keys after each of the ``current`` keys (rows of ``logits``), most likely
        first, and their probabilities (softmax, OOV mass included). A key's probability is its key class's plus
        that of the delta class that reaches it from the current key; the candidates are the keys of the
        ``max(k, CANDIDATES)`` most likely key classes and those as many most likely delta classes reach, so a
        smaller ``k`` lists the first of the same ranking. Fewer columns when fewer keys are reachable; a key that
        both lists hold is listed once, its repeat at the end with probability 0."""
        vocab, other = len(self.vocab), len(self.deltas)
        total = torch.logsumexp(logits, dim=1).double().numpy()[:, None]
        scores = logits.numpy()

        def probs(index: np.ndarray) -> np.ndarray:  # softmax probabilities of the classes ``index`` of each row
            return np.exp(np.take_along_axis(scores, index, axis=1).astype(np.float64) - total)

        pool = max(k, CANDIDATES)
        index = logits[:, :vocab].topk(min(pool, vocab), dim=1).indices.numpy()  # softmax keeps the order
        keys, prob = self.vocab[index], probs(index)
        if not other:
            return keys[:, :k], prob[:, :k]
        now = np.asarray(current)[:, None]
        move = logits[:, vocab : vocab + other].topk(min(pool, other), dim=1).indices.numpy()
        reached, moved = now + self.deltas[move], probs(vocab + move)
        # Each candidate's other class: the delta class of a key candidate, the key class of a reached key.
        by_delta = pd.Index(self.deltas).get_indexer(pd.Index((keys - now).ravel())).reshape(keys.shape)
        prob = prob + np.where(by_delta >= 0, probs(vocab + np.maximum(by_delta, 0)), 0)
        by_key = pd.Index(self.vocab).get_indexer(pd.Index(reached.ravel())).reshape(reached.shape)
        moved = moved + np.where(by_key >= 0, probs(np.maximum(by_key, 0)), 0)
        listed = (keys[:, :, None] == reached[:, None, :]).any(axis=1)
        moved = np.where(listed, -1.0, moved)  # already a key candidate: sorted last
        keys, prob = np.concatenate([keys, reached], axis=1), np.concatenate([prob, moved], axis=1)
        order = np.argsort(-prob, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(keys, order, axis=1), np.maximum(np.take_along_axis(prob, order, axis=1), 0.0)


@dataclass(frozen=True)
class NextKeyPredictions:
    """The predicted next keys after each request of days ``first_day``..D-1 (in order, concatenated) and their
    confidence, the softmax probability the model gives each (OOV mass included in the normalisation): one key per
    request (1-d arrays), or a row of the most likely keys per request, most likely first (2-d arrays)."""

    first_day: int
    keys: np.ndarray
    confidence: np.ndarray = field(repr=False)


def _uniform_days(day_keys: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The days with one key type: int64 when every day with requests holds integers (``replay.int64_keys``, as
    trace loading does, so deltas and keys stay exact), else objects."""
    days = [np.asarray(day) for day in day_keys]
    if all(np.issubdtype(day.dtype, np.integer) for day in days if len(day)):
        return [int64_keys(day) for day in days]
    return [day.astype(object, copy=False) for day in days]


def _split(day_keys: Sequence[np.ndarray], train_days: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The training stream (days 0..train_days-1 concatenated) and the later days (``_uniform_days``); ValueError
    on bad input."""
    days = _uniform_days(day_keys)
    if isinstance(train_days, bool) or not isinstance(train_days, int | np.integer):
        raise ValueError(f"train_days must be a whole number, got {train_days!r}")
    if not 1 <= train_days < len(days):
        raise ValueError(f"train_days must be at least 1 and less than the {len(days)} days, got {train_days}")
    train = np.concatenate(days[:train_days])
    if len(train) == 0:
        raise ValueError(f"the training days 0..{train_days - 1} hold no requests")
    if sum(len(day) for day in days[train_days:]) == 0:
        raise ValueError(f"the evaluation days {train_days}..{len(days) - 1} hold no requests")
    return train, days[train_days:]


def _factorize(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Int codes numbered in key order (first-seen order when keys do not sort), and the keys."""
    try:
        codes, uniques = pd.factorize(keys, sort=True)
    except TypeError:  # keys of mixed types
        codes, uniques = pd.factorize(keys, sort=False)
    return codes.astype(np.int64), np.asarray(uniques)


def _popularity(codes: np.ndarray, n_keys: int) -> np.ndarray:
    """Codes of the keys requested in ``codes``, most requested first (ties: smaller code, i.e. key order)."""
    counts = np.bincount(codes, minlength=n_keys)
    order = np.lexsort((np.arange(n_keys), -counts))
    return order[counts[order] > 0]


def _integer_keys(keys: np.ndarray) -> bool:
    """Do ``keys`` have deltas (integer keys: block addresses, ids handed out in order)?"""
    return bool(np.issubdtype(np.asarray(keys).dtype, np.integer))


def _frequent_deltas(train: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` most frequent differences between consecutive training keys that occur at least twice (ties:
    the smaller magnitude, then the smaller delta); none unless the keys are integers."""
    if not size or not _integer_keys(train) or len(train) < 3:
        return np.empty(0, dtype=np.int64)
    moves, counts = np.unique(np.diff(train), return_counts=True)
    order = np.lexsort((moves, np.abs(moves), -counts))
    order = order[counts[order] >= 2][:size]
    return moves[order]


def _next_key_loss(logits: torch.Tensor, key_targets: torch.Tensor, delta_targets: torch.Tensor) -> torch.Tensor:
    """Mean -log P(next key): the softmax probability of its key class plus that of its delta class (targets of
    -1 name no class; ``targets_of`` gives every position at least one)."""
    total = torch.logsumexp(logits, dim=-1)

    def named(targets: torch.Tensor) -> torch.Tensor:
        chosen = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(targets >= 0, chosen, -torch.inf)

    return (total - torch.logaddexp(named(key_targets), named(delta_targets))).mean()


def train_next_key(
    day_keys: Sequence[np.ndarray], *, train_days: int, hp: NextKeyHyperParams = DEFAULT_HYPER_PARAMS
) -> NextKeyModel:
    """Train the next-key LSTM on days 0..train_days-1 (never on a later day); bounded by ``hp``'s budget of steps,
    deterministic under its ``seed`` and ``threads`` unless its ``max_seconds`` safety stop fires."""
    train, _ = _split(day_keys, train_days)
    codes, uniques = _factorize(train)
    vocab = uniques[_popularity(codes, len(uniques))[: hp.vocab_size]]
    deltas = _frequent_deltas(train, hp.delta_vocab_size)
    with torch_threads(hp.threads):
        torch.manual_seed(hp.seed)
        net = NextKeyLSTM(len(vocab), len(deltas), hp.embedding_dim, hp.hidden_size)
        model = NextKeyModel(net, vocab, deltas, train_days, len(train), 0, 0.0, False, hp)
        pairs = len(train) - 1
        if pairs < 1:  # a single training request: nothing to learn from, the untrained net stays
            net.eval()
            return model
        streams = max(1, min(hp.batch_size, pairs // hp.seq_len))
        length = pairs // streams

        def shaped(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values[: streams * length].reshape(streams, length))

        key_codes, delta_codes = (shaped(values) for values in model.inputs_of(train))
        key_targets, delta_targets = (shaped(values) for values in model.targets_of(train))
        optimizer = torch.optim.Adam(net.parameters(), lr=hp.learning_rate)
        started, epochs, steps, stopped = time.perf_counter(), 0, 0, False
        net.train()
        while (epochs < hp.max_epochs / hp.loss_share or steps < hp.min_steps) and steps < hp.max_steps and not stopped:
            state = None
            for begin in range(0, length, hp.seq_len):
                optimizer.zero_grad()
                window = slice(begin, begin + hp.seq_len)
                out, state = net.encode(key_codes[:, window], delta_codes[:, window], state)
                out, keys, moves = out.flatten(0, 1), key_targets[:, window], delta_targets[:, window]
                keys, moves = keys.flatten(), moves.flatten()
                if hp.loss_share < 1:
                    scored = torch.randperm(len(out))[: max(1, round(len(out) * hp.loss_share))]
                    out, keys, moves = out[scored], keys[scored], moves[scored]
                loss = _next_key_loss(net.head(out), keys, moves)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                optimizer.step()
                steps += 1
                state = (state[0].detach(), state[1].detach())
                if steps >= hp.max_steps:
                    break
                if time.perf_counter() - started >= hp.max_seconds:
                    stopped = True
                    break
            epochs += 1
        net.eval()
    model.epochs, model.seconds, model.stopped_by_time = epochs, time.perf_counter() - started, stopped
    model.steps = steps
    return model


def _scan(
    model: NextKeyModel,
    stream: np.ndarray,
    warm: int,
    consume: Callable[[int, torch.Tensor], None],
) -> None:
    """Run the LSTM over the keys ``stream``, state carried, ``chunk`` steps at a time: over its first ``warm``
    keys with the outputs ignored, then over the rest, where ``consume(start, logits)`` receives the logits after
    ``stream[warm + start : warm + start + len(logits)]``, each the prediction of the key after that one."""
    chunk = model.hp.chunk
    key_codes, delta_codes = (torch.from_numpy(codes[None]) for codes in model.inputs_of(stream))
    state = None
    with torch_threads(model.hp.threads), torch.no_grad():
        model.net.eval()
        for begin in range(0, warm, chunk):
            end = min(begin + chunk, warm)
            _, state = model.net.encode(key_codes[:, begin:end], delta_codes[:, begin:end], state)
        for begin in range(warm, len(stream), chunk):
            end = begin + chunk
            logits, state = model.net(key_codes[:, begin:end], delta_codes[:, begin:end], state)
            consume(begin - warm, logits[0])


def _markov_top(
    train: np.ndarray, prev: np.ndarray, popular: np.ndarray, k: int, n_keys: int
) -> tuple[np.ndarray, np.ndarray]:
    """Markov-1's top-``k`` codes after each code of ``prev`` (-2 pads when the training days hold fewer than
    ``k`` keys): successors by count (ties: the more popular key), then ``popular`` keys not among them; and
    beside each, how often it followed that code in ``train`` (0 for the popular fill-up and the pads).

    ``train`` and ``prev`` are codes 0..n_keys-1 of one numbering; keys never seen in training simply have no
    successors. Tables are built only for the distinct previous keys that occur."""
    rank = np.full(n_keys, len(popular), dtype=np.int64)
    rank[popular] = np.arange(len(popular))
    pair, count = np.unique(train[:-1] * n_keys + train[1:], return_counts=True)
    before, after = pair // n_keys, pair % n_keys
    order = np.lexsort((rank[after], -count, before))
    before, after, count = before[order], after[order], count[order]
    starts = np.searchsorted(before, before, side="left")  # first pair of each previous key
    keep = np.arange(len(before)) - starts < k
    before, after, count = before[keep], after[keep], count[keep]
    slot = np.arange(len(before)) - np.searchsorted(before, before, side="left")
    wanted, inverse = np.unique(prev, return_inverse=True)
    row_of = np.full(n_keys, -1, dtype=np.int64)
    row_of[wanted] = np.arange(len(wanted))
    table = np.full((len(wanted), k), -2, dtype=np.int64)
    counts = np.zeros((len(wanted), k), dtype=np.int64)
    known = row_of[before] >= 0
    table[row_of[before[known]], slot[known]] = after[known]
    counts[row_of[before[known]], slot[known]] = count[known]
    # Fill the empty slots, row by row in order, with popular keys that are not already successors.
    candidates = popular[: 2 * k]  # at most k - 1 of them can already be in a row
    for begin in range(0, len(wanted), 65536):
        rows = table[begin : begin + 65536]
        filled = (rows >= 0).sum(axis=1)
        present = (rows[:, :, None] == candidates[None, None, :]).any(axis=1)
        free = np.argsort(present, axis=1, kind="stable")  # absent candidates first, in popularity order
        usable = np.take_along_axis(~present, free, axis=1)
        picks = np.where(usable, candidates[free], -2)
        picks = np.concatenate([picks, np.full((len(rows), k), -2, dtype=np.int64)], axis=1)  # too few candidates
        for j in range(k):
            need = filled <= j  # slot j is empty: take the (j - filled)-th usable candidate
            if need.any():
                rows[need, j] = picks[need, j - filled[need]]
    return table[inverse.reshape(-1)], counts[inverse.reshape(-1)]


def _markov1_delta_hits(train: np.ndarray, targets: np.ndarray) -> tuple[int, int]:
    """Top-1 and top-``TOP_K`` hits of Markov-1 over deltas (module doc) on ``targets``, the requests after
    ``train``; integer keys."""
    if len(train) < 2:  # no training delta
        return 0, 0
    codes, _ = _factorize(np.diff(np.concatenate([train, targets])))
    fitted = codes[: len(train) - 1]  # the deltas between training requests
    reaching = codes[len(train) - 1 :]  # the delta from the request before each target to it
    before = codes[len(train) - 2 : len(train) - 2 + len(targets)]  # the delta that led to that request
    n_codes = int(codes.max()) + 1
    table, _ = _markov_top(fitted, before, _popularity(fitted, n_codes), TOP_K, n_codes)
    return int((table[:, 0] == reaching).sum()), int((table == reaching[:, None]).any(axis=1).sum())


def next_key_accuracy(
    day_keys: Sequence[np.ndarray],
    *,
    train_days: int,
    hp: NextKeyHyperParams = DEFAULT_HYPER_PARAMS,
    model: NextKeyModel | None = None,
) -> dict:
    """Top-1 and top-10 next-key accuracy on days train_days..D-1 of the LSTM, Markov-1 and most-popular, all
    fitted on days 0..train_days-1 (module doc). ``model`` reuses a ``train_next_key`` model of the same split
    (its hyper-parameters then apply, not ``hp``).

    Returns ``next_key_top1`` and ``next_key_top10`` (predictor -> accuracy), ``next_key_eval_requests``,
    ``next_key_train_requests``, ``next_key_vocab`` (keys in the vocabulary, OOV class not counted),
    ``next_key_oov_share`` (evaluated targets outside it), ``next_key_delta_vocab`` (deltas in the delta
    vocabulary), ``next_key_unreachable_share`` (targets no class of the LSTM names: outside both vocabularies),
    ``next_key_lstm_epochs``, ``next_key_lstm_steps``, ``next_key_lstm_seconds`` and ``next_key_notes``."""
    train, later = _split(day_keys, train_days)
    if model is None:
        model = train_next_key(day_keys, train_days=train_days, hp=hp)
    elif model.train_days != train_days or model.train_requests != len(train):
        raise ValueError("model was trained on another split of the days: train it with the same train_days")
    hp = model.hp
    later_all = np.concatenate(later)
    targets = later_all[: hp.max_eval_requests]
    n = len(targets)
    codes, _ = _factorize(np.concatenate([train, targets]))
    train_codes, target_codes = codes[: len(train)], codes[len(train) :]
    prev_codes = np.concatenate([train_codes[-1:], target_codes[:-1]])
    n_keys = int(codes.max()) + 1
    popular = _popularity(train_codes, n_keys)
    hits1: dict[str, int] = {}
    hits10: dict[str, int] = {}

    top = popular[:TOP_K]
    hits1["most_popular"] = int((target_codes == top[0]).sum())
    hits10["most_popular"] = int(np.isin(target_codes, top).sum())

    markov, _ = _markov_top(train_codes, prev_codes, popular, TOP_K, n_keys)
    hits1["markov1"] = int((markov[:, 0] == target_codes).sum())
    hits10["markov1"] = int((markov == target_codes[:, None]).any(axis=1).sum())

    predictors = PREDICTORS
    if _integer_keys(train):
        predictors = (*PREDICTORS, "markov1_delta")
        hits1["markov1_delta"], hits10["markov1_delta"] = _markov1_delta_hits(train, targets)

    vocab, deltas = len(model.vocab), len(model.deltas)
    context = train[-(hp.seq_len + 1) :]  # warm-up requests, then the last training request
    stream = np.concatenate([context, targets[:-1]])
    current = stream[len(context) - 1 :]  # the request before each target
    lstm1 = lstm10 = 0

    def score(begin: int, logits: torch.Tensor) -> None:
        nonlocal lstm1, lstm10
        best, _ = model.top_keys(logits, current[begin : begin + len(logits)], TOP_K)
        truth = targets[begin : begin + len(best)]
        lstm1 += int((best[:, 0] == truth).sum())
        lstm10 += int((best == truth[:, None]).any(axis=1).sum())

    _scan(model, stream, len(context) - 1, score)
    hits1["lstm"], hits10["lstm"] = lstm1, lstm10
    oov = int((model.classes_of(targets) == vocab).sum())
    unreachable = int((model.targets_of(np.concatenate([train[-1:], targets]))[0] == vocab + deltas).sum())
    notes = [
        f"next-key accuracy over the first {n} of {len(later_all)} requests of days {train_days}.."
        f"{len(day_keys) - 1}, fitted on {len(train)} requests of days 0..{train_days - 1}",
        f"lstm vocabulary: the {vocab} most frequent training keys and {deltas} deltas; {oov / n:.1%} of "
        f"evaluated next keys are outside the keys, {unreachable / n:.1%} outside both, which count as lstm "
        "misses (markov1 and most_popular may predict any training key)",
    ]
    if model.stopped_by_time:
        notes.append(training_stopped_note(model))
    if len(popular) < TOP_K:
        notes.append(f"the training days hold {len(popular)} distinct keys: top-10 lists are that short")
    return {
        "next_key_top1": {name: hits1[name] / n for name in predictors},
        "next_key_top10": {name: hits10[name] / n for name in predictors},
        "next_key_eval_requests": int(n),
        "next_key_train_requests": int(len(train)),
        "next_key_vocab": int(vocab),
        "next_key_oov_share": oov / n,
        "next_key_delta_vocab": int(deltas),
        "next_key_unreachable_share": unreachable / n,
        "next_key_lstm_epochs": int(model.epochs),
        "next_key_lstm_steps": int(model.steps),
        "next_key_lstm_seconds": float(model.seconds),
        "next_key_notes": notes,
    }


def training_stopped_note(model: NextKeyModel) -> str:
    """What a model whose ``max_seconds`` safety stop fired tells its reader: it is not the step budget's net."""
    hp = model.hp
    return (
        f"lstm training stopped by its max_seconds safety stop ({hp.max_seconds:g} s) after {model.steps} of "
        f"{hp.max_steps} steps, in epoch {model.epochs}: a slower machine than the step budget was sized for, "
        "so another run may give other results"
    )


PREFETCH_KEYS = 4  # the most likely next keys kept per request: at a threshold above 1/5 no more can qualify


def prefetch_predictions(
    day_keys: Sequence[np.ndarray],
    *,
    train_days: int,
    hp: NextKeyHyperParams = DEFAULT_HYPER_PARAMS,
    model: NextKeyModel | None = None,
    top_k: int = PREFETCH_KEYS,
) -> NextKeyPredictions:
    """The LSTM's ``top_k`` most likely real next keys after every request of days train_days..D-1 (all of them:
    ``max_eval_requests`` does not apply) and their softmax probabilities (2-d, most likely first), the model
    trained on the earlier days (or ``model``, a ``train_next_key`` model of the same split, whose
    hyper-parameters then apply). Causal: each uses the requests up to it, the training days included."""
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
    train, later = _split(day_keys, train_days)
    if model is None:
        model = train_next_key(day_keys, train_days=train_days, hp=hp)
    elif model.train_days != train_days or model.train_requests != len(train):
        raise ValueError("model was trained on another split of the days: train it with the same train_days")
    requests = np.concatenate(later)
    context = train[-model.hp.seq_len :]
    pool = max(top_k, CANDIDATES)  # top_keys' candidates: its rows have this many columns
    columns = min(top_k, min(pool, len(model.vocab)) + min(pool, len(model.deltas)))
    best = np.empty((len(requests), columns), dtype=model.vocab.dtype)
    confidence = np.empty(best.shape, dtype=np.float64)

    def keep(begin: int, logits: torch.Tensor) -> None:
        keys, probs = model.top_keys(logits, requests[begin : begin + len(logits)], top_k)
        best[begin : begin + len(keys)] = keys
        confidence[begin : begin + len(keys)] = probs

    _scan(model, np.concatenate([context, requests]), len(context), keep)
    return NextKeyPredictions(first_day=train_days, keys=best, confidence=confidence)


def markov1_predictions(
    day_keys: Sequence[np.ndarray], *, train_days: int, top_k: int = PREFETCH_KEYS
) -> NextKeyPredictions:
    """The prefetch baseline beside the LSTM's: Markov-1's ``top_k`` most likely next keys after every request of
    days train_days..D-1, with the probabilities count(previous, next) / count(previous) of the training days.
    Over deltas for integer keys (``markov1_delta``: the next key is the current one plus a likely next delta,
    given the delta that led to it), else over keys. A state never followed in training backs off to the most
    frequent training symbols, each at its share of them; a row of a seen state is filled up with those at
    probability 0, as ``next_key_accuracy``'s Markov-1 fills it."""
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
    train, later = _split(day_keys, train_days)
    requests = np.concatenate(later)
    stream = np.concatenate([train, requests])
    deltas = _integer_keys(stream)
    if deltas:  # symbol i leads from request i to request i + 1; a request's state is the symbol that led to it
        codes, symbols = _factorize(np.diff(stream))
        fitted, states = codes[: len(train) - 1], codes[len(train) - 1 : len(stream) - 1]
    else:
        codes, symbols = _factorize(stream)
        fitted, states = codes[: len(train)], codes[len(train) :]
    n = int(codes.max()) + 1
    table, counts = _markov_top(fitted, states, _popularity(fitted, n), top_k, n)
    totals = np.bincount(fitted[:-1], minlength=n)[states]
    confidence = counts / np.maximum(totals, 1)[:, None]
    if len(fitted):  # back-off for states with no successor in training
        share = np.bincount(fitted, minlength=n)[np.maximum(table, 0)] / len(fitted)
        confidence = np.where((totals == 0)[:, None] & (table >= 0), share, confidence)
    named = symbols[np.maximum(table, 0)]
    keys = requests[:, None] + named if deltas else named
    keys = np.where(table >= 0, keys, requests[:, None])  # no symbol: the current key, at probability 0
    return NextKeyPredictions(first_day=train_days, keys=keys, confidence=confidence)


def prefetch_replay(
    day_keys: Sequence[np.ndarray],
    *,
    top_n: int,
    capacity: int,
    warmup_days: int,
    predictions: NextKeyPredictions,
    threshold: float = 0.5,
    half_life_days: float = 2.0,
) -> dict:
    """``replay``'s ``ours`` with learned prefetch: hits over days warmup_days..D-1 of each day's frequency top-N
    plus a read-through LRU of ``capacity - top_n`` keys (requests to the day's top-N are hits and leave the LRU
    untouched), where after each request of a day with predictions every predicted next key whose confidence is
    >= ``threshold`` and that is neither precomputed that day nor cached enters the LRU as most recent (the less
    likely first, so the most likely ends most recent; each evicts the least recent key: prefetches use the same
    capacity; a predicted key the trace never requests is prefetched too, and only costs its slot).

    Days before ``predictions.first_day`` replay plain ours; they can only be warm-up days (``warmup_days`` must
    be >= ``predictions.first_day``), so every counted day has predictions. With ``threshold`` above 1 nothing is
    prefetched and ``hit_rate`` equals ``replay``'s ``hit_rate_ours``. Returns ``hit_rate``, ``top_n``,
    ``capacity``, ``threshold``, ``prefetched`` (prefetches on counted days) and ``prefetch_used`` (those whose
    key was then requested while still in the LRU: a hit the prefetch made, or kept)."""
    run = _PrefetchRun.of(day_keys, top_n, capacity, warmup_days, [predictions], threshold, half_life_days)
    day_hits, prefetched, used = run.replay(run.wanted[0])
    return {
        "hit_rate": run.rate(day_hits),
        "top_n": int(top_n),
        "capacity": int(capacity),
        "threshold": float(threshold),
        "prefetched": int(prefetched),
        "prefetch_used": int(used),
    }


NO_PREFETCH = "none"


def chosen_prefetch(
    day_keys: Sequence[np.ndarray],
    *,
    candidates: dict[str, NextKeyPredictions],
    top_n: int,
    capacity: int,
    warmup_days: int,
    threshold: float = 0.5,
    half_life_days: float = 2.0,
) -> dict:
    """``prefetch_replay`` whose predictor is chosen day by day, never by the day it serves: counted day d takes,
    of no prefetch (``NO_PREFETCH``) and the ``candidates`` (name -> predictions of the same days), the one whose
    replay on its own got the most hits on counted days warmup_days..d-1 (ties: the first, no prefetch before
    any candidate, the candidates in the order given). The first counted day has no evidence and prefetches
    nothing (as do the warm-up days), and a predictor that costs hits is dropped once the days before show it.
    Returns ``hit_rate``, ``prefetched``,
    ``chosen`` (the name of each counted day) and ``candidates``: each candidate's own ``prefetch_replay``
    outcome (``hit_rate``, ``prefetched``, ``prefetch_used``)."""
    if not candidates:
        raise ValueError("chosen_prefetch needs at least one candidate")
    if NO_PREFETCH in candidates:
        raise ValueError(f"a candidate cannot be named {NO_PREFETCH!r}")
    run = _PrefetchRun.of(
        day_keys, top_n, capacity, warmup_days, list(candidates.values()), threshold, half_life_days, list(candidates)
    )
    names = [NO_PREFETCH, *candidates]
    options = [run.nothing, *run.wanted]
    outcomes = [run.replay(wanted) for wanted in options]
    day_hits = [hits for hits, _, _ in outcomes]
    picks = [0] * len(run.days)
    for d in range(warmup_days + 1, len(run.days)):
        picks[d] = max(range(len(names)), key=lambda i: (sum(day_hits[i][warmup_days:d]), -i))
    offsets = np.cumsum([0] + [len(day) for day in run.days[run.first :]]).tolist()
    mixed: list = list(run.nothing)
    for d in range(run.first, len(run.days)):
        begin, end = offsets[d - run.first], offsets[d - run.first + 1]
        mixed[begin:end] = options[picks[d]][begin:end]
    hits, prefetched, _ = run.replay(mixed)
    return {
        "hit_rate": run.rate(hits),
        "prefetched": int(prefetched),
        "chosen": [names[pick] for pick in picks[warmup_days:]],
        "candidates": {
            name: {"hit_rate": run.rate(hits), "prefetched": int(done), "prefetch_used": int(used)}
            for name, (hits, done, used) in zip(names[1:], outcomes[1:], strict=True)
        },
    }


@dataclass(frozen=True)
class _PrefetchRun:
    """A checked trace, its days' precomputed sets and each prediction's keys to prefetch after each request
    (codes, the least likely first); ``replay`` runs ours with one such list of the predicted requests."""

    days: list[np.ndarray]
    chosen: list[set]
    slots: int
    warmup_days: int
    first: int
    wanted: list[list]
    nothing: list

    @classmethod
    def of(
        cls,
        day_keys: Sequence[np.ndarray],
        top_n: int,
        capacity: int,
        warmup_days: int,
        predictions: list[NextKeyPredictions],
        threshold: float,
        half_life_days: float,
        names: list[str] | None = None,
    ) -> _PrefetchRun:
        if len(day_keys) < 2:
            raise ValueError(
                f"prefetch needs at least 2 days (a warm-up day with predictions after it), got {len(day_keys)}"
            )
        if isinstance(top_n, bool) or not isinstance(top_n, int | np.integer):
            raise ValueError(f"prefetch needs a fixed whole top_n, got {top_n!r}")
        if capacity < 1 or top_n < 0:
            raise ValueError("need capacity >= 1 and top_n >= 0")
        if top_n > capacity:
            raise ValueError(f"top_n ({top_n}) cannot exceed capacity ({capacity})")
        if not 1 <= warmup_days < len(day_keys):
            raise ValueError(
                f"warmup_days must be at least 1 and less than the {len(day_keys)} days, got {warmup_days}"
            )
        days, keys = _as_codes(_uniform_days(day_keys))
        firsts = {given.first_day for given in predictions}
        if len(firsts) != 1:
            raise ValueError(f"the predictions start on different days: {sorted(firsts)}")
        first = firsts.pop()
        if not 1 <= first <= warmup_days:
            raise ValueError(
                f"warmup_days ({warmup_days}) must be >= the first predicted day ({first}): only days with "
                "predictions can be counted"
            )
        predicted = sum(len(day) for day in days[first:])
        rows = [
            _prediction_rows(given, predicted, first, len(days), name)
            for given, name in zip(predictions, names or [None] * len(predictions), strict=True)
        ]
        if np.isnan(threshold):
            raise ValueError("threshold must be a number, got NaN")
        # Codes of the predicted keys; a key the trace never requests gets a code of its own after the trace's
        # (one per key across every prediction): it is prefetched like any other and takes a slot, a wrong guess
        # that costs what it costs a real cache. Each prediction is looked up in its own dtype (pooled, int64 and
        # uint64 would become float64, integers beside strings strings); only the unknown keys are pooled.
        codes = [keys.get_indexer(pd.Index(guessed.ravel())) for guessed, _ in rows]
        unknown = [guessed.ravel()[mine < 0].astype(object) for (guessed, _), mine in zip(rows, codes, strict=True)]
        extra = len(keys) + pd.factorize(np.concatenate([np.array([], dtype=object), *unknown]))[0]
        bounds = np.cumsum([0, *(len(new_keys) for new_keys in unknown)])
        for mine, begin, end in zip(codes, bounds[:-1], bounds[1:], strict=True):
            mine[mine < 0] = extra[begin:end]
        wanted = []
        for (guessed, sure), flat in zip(rows, codes, strict=True):
            mine = flat.reshape(guessed.shape)
            go = sure >= threshold
            per_request: list = [()] * len(mine)  # the keys to prefetch, the least likely first (most have none)
            for i in np.flatnonzero(go.any(axis=1)).tolist():
                per_request[i] = mine[i, ::-1][go[i, ::-1]].tolist()
            wanted.append(per_request)
        chosen = _precomputed_sets(days, top_n=top_n, half_life_days=half_life_days)
        return cls(days, chosen, capacity - top_n, warmup_days, first, wanted, [()] * predicted)

    def rate(self, day_hits: list[int]) -> float:
        requests = sum(len(day) for day in self.days[self.warmup_days :])
        return sum(day_hits[self.warmup_days :]) / requests if requests else 0.0

    def replay(self, wanted: list) -> tuple[list[int], int, int]:
        """Hits per day, prefetches on counted days and those of them used, prefetching ``wanted``."""
        cache: OrderedDict[int, None] = OrderedDict()
        pending: dict[int, bool] = {}  # prefetched keys in the LRU not yet requested -> prefetched on a counted day
        slots, per_day = self.slots, []
        prefetched = used = offset = 0
        for d, day in enumerate(self.days):
            top = self.chosen[d]
            counted = d >= self.warmup_days
            day_hits = 0
            if d >= self.first:
                guesses = wanted[offset : offset + len(day)]
                offset += len(day)
            else:
                guesses = [()] * len(day)
            for key, guessed_keys in zip(day.tolist(), guesses, strict=True):
                if key in top:
                    day_hits += 1
                elif key in cache:
                    cache.move_to_end(key)
                    day_hits += 1
                    if pending.pop(key, False) and counted:
                        used += 1
                elif slots > 0:
                    cache[key] = None
                    if len(cache) > slots:
                        pending.pop(cache.popitem(last=False)[0], None)
                for guess in guessed_keys:
                    if slots > 0 and guess not in top and guess not in cache:
                        cache[guess] = None
                        pending[guess] = counted
                        prefetched += counted
                        if len(cache) > slots:
                            pending.pop(cache.popitem(last=False)[0], None)
            per_day.append(day_hits)
        return per_day, prefetched, used


def _prediction_rows(
    predictions: NextKeyPredictions, predicted: int, first: int, days: int, name: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The predictions' keys (integers as int64, as the trace's: ``replay.int64_keys``) and confidences as 2-d
    rows, checked against the ``predicted`` requests; an error names the candidate ``name`` if given."""
    whose = "predictions" if name is None else f"candidate {name!r}'s predictions"
    guessed = np.asarray(predictions.keys)
    if guessed.dtype.kind in "iu":
        guessed = int64_keys(guessed)
    sure = np.asarray(predictions.confidence, dtype=np.float64)
    if guessed.ndim == 1:
        guessed, sure = guessed.reshape(-1, 1), sure.reshape(-1, 1)
    if guessed.shape != sure.shape or guessed.ndim != 2:
        raise ValueError(f"{whose}' keys {guessed.shape} and confidences {sure.shape} differ in shape")
    if len(guessed) != predicted:
        raise ValueError(
            f"{whose} cover {len(guessed)} requests, not the {predicted} requests of days {first}..{days - 1}"
        )
    return guessed, sure


def learned_prefetch(
    day_keys: Sequence[np.ndarray],
    *,
    top_n: int,
    capacity: int,
    model: NextKeyModel,
    train_days: int,
    threshold: float = 0.5,
    hp: NextKeyHyperParams = DEFAULT_HYPER_PARAMS,
) -> dict:
    """The ``prefetch`` entry of ``replay --strategy``: ``prefetch_replay`` with ``model``'s predictions, counted
    on days ``train_days``..D-1 (the days the model did not train on), beside ``replay``'s ours and LRU on those
    same days (``hit_rate_ours_same_days``, ``hit_rate_lru_same_days``, ``hit_rate_s3fifo_same_days``,
    ``hit_rate_arc_same_days``, the last two of the whole capacity) and the same prefetch from Markov-1's
    predictions (``markov1_predictions``: ``hit_rate_markov1_prefetch``, ``markov1_prefetched``,
    ``markov1_prefetch_over`` deltas or keys), so its effect is measured, not assumed, and next to a simple
    baseline, and prefetch by whichever of them (or none) did best on the counted days before each day
    (``chosen_prefetch``: ``hit_rate_chosen_prefetch``, ``chosen_prefetch``, ``chosen_prefetched``)."""
    predictions = prefetch_predictions(day_keys, train_days=train_days, hp=hp, model=model)
    candidates = {"markov1": markov1_predictions(day_keys, train_days=train_days), "lstm": predictions}
    chosen = chosen_prefetch(
        day_keys, candidates=candidates, top_n=top_n, capacity=capacity, warmup_days=train_days, threshold=threshold
    )
    lstm, baseline = chosen["candidates"]["lstm"], chosen["candidates"]["markov1"]
    same_days = replay(day_keys, top_n=top_n, capacity=capacity, warmup_days=train_days)
    requests = sum(len(day) for day in day_keys[train_days:])
    return {
        **lstm,
        "top_n": int(top_n),
        "capacity": int(capacity),
        "threshold": float(threshold),
        "counted_from_day": train_days,
        "hit_rate_ours_same_days": same_days["hit_rate_ours"],
        "hit_rate_lru_same_days": same_days["hit_rate_lru"],
        "hit_rate_s3fifo_same_days": s3fifo_hits(day_keys, capacity, warmup_days=train_days) / requests,
        "hit_rate_arc_same_days": arc_hits(day_keys, capacity, warmup_days=train_days) / requests,
        "hit_rate_markov1_prefetch": baseline["hit_rate"],
        "markov1_prefetched": baseline["prefetched"],
        "hit_rate_chosen_prefetch": chosen["hit_rate"],
        "chosen_prefetch": chosen["chosen"],
        "chosen_prefetched": chosen["prefetched"],
        "markov1_prefetch_over": "deltas" if _integer_keys(predictions.keys) else "keys",
    }
