"""Admission policies for live values: which read-through misses ``PredictionCache.get_or_compute`` stores.

A *live-tier lookup* is a lookup of a key that the published version does not hold (the client then reads
``{kind}:live:{key}``). A policy sees every live-tier lookup of ``get_or_compute`` in the same pipeline as
that ``GET`` (so a hit costs no extra round trip) and decides, on a miss, whether the computed value is
stored; it also sees the live values ``get`` and ``get_many`` read (one round trip after them), not their misses:

- ``always``: every miss is stored (the default, and the behaviour before admission existed).
- ``second_miss``: the first live-tier lookup of a key sets ``{kind}:seen:{key}`` with ``SET ... PX W NX GET``;
  a miss is stored only when that marker was already there, i.e. the key was looked up in the live tier
  (and, the first time, missed) within the window ``W`` that started at the marker's creation. Memory: one
  marker of about ``70 + len(key)`` bytes (measured on Valkey 8) per distinct key looked up in the last ``W``;
  each expires, so the total is bounded by the live-tier lookup rate times ``W``.
- ``frequency``: a count-min sketch in one string ``{kind}:sketch`` (``{kind}:sketch:{width}x{depth}`` for another
  shape than the default, so clients of two shapes never share one): a big-endian u32 count of lookups, then
  ``depth`` rows of ``width`` 4-bit saturating counters (``BITFIELD ... OVERFLOW SAT INCRBY u4``), then a u32
  aging cursor. Every live-tier lookup increments its key's counter in each row; a miss is stored when the key's
  estimate (the smallest of its counters, this lookup included) is at least ``threshold``. The first miss that
  sees the count at ``sample_size`` or more zeroes the count and starts an aging, which halves every counter,
  ``AGE_STEP_BYTES`` bytes of counters per miss (one Lua script per miss, atomic; the cursor, the next byte to
  halve or 0 when no aging runs, is kept in the sketch itself, so Cluster keeps one key), so old popularity fades
  and no command's work grows with the sketch: a single pass over the whole string took 7 ms of server time at
  the default 64 KiB and seconds at the largest sketch, while other clients waited. Memory: a string of
  ``8 + depth * width / 2`` bytes per kind, fixed (``FrequencySketch.bytes``): every lookup's ``BITFIELD`` also
  addresses the cursor, so the first creates the string at its full size rather than growing it (growing lets
  Redis allocate up to twice the length).
- ``probation``: a kind holds ``capacity`` keys in Redis, published and live together: the live tier is a cache of
  ``capacity - N`` keys (N: the current version's keys, which ``publish_version`` and the embedding sync write to
  ``{kind}:fifo:{{...}}:published`` after each flip or in-place patch) that the policy itself keeps, in the manner of
  S3-FIFO (Yang et al., SOSP'23) with an LRU main queue; this is the split of one capacity that ``ml.replay`` and the
  self-tuned precompute share model. A bigger published version shrinks the tier over the next misses (each moves or
  evicts at most ``MAX_STEPS`` keys); a miss that finds no room is not kept. A missed key enters a small FIFO
  (``probation_sizes``: a tenth of the tier) unless it is in the ghost list, which sends it straight to the main LRU.
  When the tier is full, the oldest probation key moves to the main LRU if it was looked up while in probation, else it
  leaves (its value is deleted: ``evictable``) and its name goes to the ghost list; once probation is short, the main
  LRU's least recent key leaves instead. Keys asked for once thus pass through a tenth of the cache and never push out
  keys asked for again. Every live-tier lookup runs one script (``_TOUCH``: count a probation hit, or refresh the key in
  the LRU); every stored miss runs ``_ADMIT`` (evict, insert; it also records ``capacity``), which on one server deletes
  the live values of the keys it evicted in the same atomic step (on a cluster the client deletes them after it). After
  each flip of ``publish_version`` (not the embedding sync's in-place patches) the publisher settles the tier
  (``publish.settle_published``): the new version's keys leave the main LRU and their live values are deleted (a live
  copy of a published key only holds a slot; one still in probation stays until the FIFO moves it), and the keys the
  version before served and the new one drops enter the main LRU below every key there, best first, while the tier has
  room (``UNTRACK``, ``HAND_OVER``), so a smaller version leaves a warm tier rather than an empty one. State, in one
  Redis Cluster slot per kind (hash tag):
  ``{kind}:fifo:{{...}}:small`` (list), ``:hits`` (hash), ``:main`` and ``:ghost`` (sorted sets by a sequence number),
  ``:seq``, ``:published``, ``:tier`` (hash: ``capacity``, ``live_ttl_s``, and ``order_version``, the version
  ``:order`` lists),
  ``:order`` (list: that version's first ``capacity`` keys in publish order, written only once a ``probation`` client
  has stored a miss); at most ``capacity`` tracked keys and ``capacity - small`` ghost names, about 100 bytes plus the
  key twice per tracked key, and up to ``capacity`` names in ``:order``. Redis's own maxmemory eviction stays a safety
  net beneath it. A key that leaves the tier keeps a live value that is to live longer than the tier's live TTL, or
  for good (``evictable``): a campaign's warming wrote it (``publish.write_live_values``, to the campaign's end), on a
  key a reader had also looked up; the tier stops tracking it and leaves it to its own TTL. A task run's value, whose
  type's TTL is not longer, goes as the tier's own values do.

``ml.replay`` models these decisions request by request (``admission_decisions``). Redis errors are never
raised by the client: a failed lookup is a miss that stores nothing.
"""

from __future__ import annotations

import functools
import hashlib
import numbers
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

from .keys import FIFO_PARTS, KeySchema

AdmissionName = Literal["always", "second_miss", "frequency", "probation"]  # a Config field of this type lists them
ADMISSION_NAMES: tuple[str, ...] = get_args(AdmissionName)
MAX_WINDOW_S = 10**15  # Redis refuses a PX whose expiry in ms from the epoch overflows 64 bits (about 9.2e15 s)
SKETCH_SHAPE = (32768, 4)  # the default width and depth: its sketch is ``{kind}:sketch``, others have their own
SKETCH_HEADER_NIBBLES = 8  # the u32 lookup count in front of the counters, in 4-bit units
COUNTER_MAX = 15  # 4-bit counters saturate here


@dataclass(frozen=True)
class Decision:
    """What the live-tier lookup told the policy: store a miss?, and should a step of the sketch's aging run now?"""

    admit: bool
    age: bool = False


class AdmissionPolicy(Protocol):
    name: str

    def observe(self, pipe: Any, schema: KeySchema, kind: str, key: str) -> int:
        """Queue the policy's commands after the live ``GET`` on ``pipe``; return how many were queued."""
        ...

    def decide(self, replies: list) -> Decision:
        """The decision from the replies of the commands ``observe`` queued."""
        ...

    def after_miss(
        self,
        schema: KeySchema,
        kind: str,
        key: str,
        decision: Decision,
        live_ttl_s: int,
        *,
        deletes: bool = False,
        epoch: bytes | None = None,
    ) -> tuple[Any, ...] | None:
        """The command of the policy's housekeeping on a miss of ``key`` (the sketch's aging, the probation
        queues), which the caller sends in the same round trip as the value it stores (for ``live_ttl_s``);
        None: nothing to do. ``deletes`` (one server, not a cluster): the command deletes the live values it
        evicts itself; ``epoch`` (with ``deletes``): the kind's invalidation epoch the store compared (b"" for none),
        so that a key whose store an invalidation refused is not admitted."""
        ...

    def evicted(self, reply: Any) -> Sequence[str]:
        """The keys whose live values ``after_miss``'s command evicted and did not delete itself (``deletes``), from
        its reply: the caller deletes them."""
        ...

    def refused(self, reply: Any) -> bool:
        """Whether ``after_miss``'s command (its reply) kept out the value the caller stored with it: ``probation``
        without room beside the published keys (the value is deleted as it was written); counted in ``rejected``."""
        ...


@dataclass(frozen=True)
class Always:
    """Store every computed value (no extra commands at all)."""

    name = "always"

    def observe(self, pipe: Any, schema: KeySchema, kind: str, key: str) -> int:
        return 0

    def decide(self, replies: list) -> Decision:
        return Decision(True)

    def after_miss(
        self,
        schema: KeySchema,
        kind: str,
        key: str,
        decision: Decision,
        live_ttl_s: int,
        *,
        deletes: bool = False,
        epoch: bytes | None = None,
    ) -> tuple[Any, ...] | None:
        return None

    def evicted(self, reply: Any) -> Sequence[str]:
        return ()

    def refused(self, reply: Any) -> bool:
        return False


@dataclass(frozen=True)
class SecondMiss:
    """Store a miss only when the key had a live-tier lookup (a first miss) within ``window_s`` before."""

    window_s: float = 3600.0
    name = "second_miss"

    def __post_init__(self) -> None:
        # A window Redis cannot take (inf, 1e16 s) made every lookup's SET PX fail: nothing ever stored.
        window = self.window_s
        if isinstance(window, bool) or not isinstance(window, numbers.Real) or not 0 < window <= MAX_WINDOW_S:
            raise ValueError(f"window_s must be a number of seconds in (0, {MAX_WINDOW_S:.0e}], got {window!r}")

    def observe(self, pipe: Any, schema: KeySchema, kind: str, key: str) -> int:
        # NX keeps the window anchored at the first lookup; GET tells whether the marker was already there.
        pipe.set(schema.admission_seen(kind, key), 1, px=max(1, round(self.window_s * 1000)), nx=True, get=True)
        return 1

    def decide(self, replies: list) -> Decision:
        return Decision(replies[0] is not None)

    def after_miss(
        self,
        schema: KeySchema,
        kind: str,
        key: str,
        decision: Decision,
        live_ttl_s: int,
        *,
        deletes: bool = False,
        epoch: bytes | None = None,
    ) -> tuple[Any, ...] | None:
        return None

    def evicted(self, reply: Any) -> Sequence[str]:
        return ()

    def refused(self, reply: Any) -> bool:
        return False


# Bytes of counters one aging step halves: one script call reads and writes at most this many, whatever the sketch's
# size (about half a millisecond of server time), and an aging of the default 64 KiB takes 16 misses.
AGE_STEP_BYTES = 4096

# KEYS: the sketch; ARGV: the sample, the counters' bytes, the step's bytes. One step of an aging: halves the next
# ARGV[3] bytes of counters (byte b -> (b >> 1) & 0x77) from the cursor (the u32 after the counters) and moves it on
# (0 once the last byte is halved). With no aging running (cursor 0) it starts one, zeroing the count, only if the
# count still is at least ARGV[1]: two clients that both saw the sample full start one aging, not two, and a step
# already done by another client is never repeated. Replies 1 when it halved a step, else 0.
_AGE_SKETCH = """
local sample, size, step = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local at = 8 * (4 + size)
local state = redis.call('BITFIELD', KEYS[1], 'GET', 'u32', 0, 'GET', 'u32', at)
local from = state[2]
if from == 0 then
  if state[1] < sample then return 0 end
  redis.call('BITFIELD', KEYS[1], 'SET', 'u32', 0, 0)
end
local to = math.min(from + step, size)
local half = {}
for b = 0, 255 do half[string.char(b)] = string.char(math.floor(b / 32) * 16 + math.floor((b % 16) / 2)) end
local s = redis.call('GETRANGE', KEYS[1], 4 + from, 3 + to)
if #s > 0 then redis.call('SETRANGE', KEYS[1], 4 + from, (string.gsub(s, '.', half))) end
redis.call('BITFIELD', KEYS[1], 'SET', 'u32', at, to < size and to or 0)
return 1
"""


@dataclass(frozen=True)
class FrequencySketch:
    """Store a miss when the count-min estimate of the key's live-tier lookups reaches ``threshold``.

    ``width`` counters per row, ``depth`` rows, counters of 4 bits (0..15); aged (halved) once
    ``sample_size`` lookups (default ``10 * width``) were counted since the last aging.
    """

    width: int = SKETCH_SHAPE[0]
    depth: int = SKETCH_SHAPE[1]
    threshold: int = 2
    sample_size: int = 0  # 0: 10 * width
    name = "frequency"

    def __post_init__(self) -> None:
        for field in ("width", "depth", "threshold", "sample_size"):
            value = getattr(self, field)
            # A float width (1e5 from a config file) passed the range checks, then made every lookup's BITFIELD
            # offset "#12353.0", which Redis refuses: every lookup an error, nothing ever stored.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{field} must be a whole number, got {value!r}")
            object.__setattr__(self, field, int(value))  # numpy's integers, which redis-py refuses to send
        if not 1 <= self.width <= 1 << 24:
            raise ValueError(f"width must be between 1 and 2**24, got {self.width}")
        if not 1 <= self.depth <= 16:
            raise ValueError(f"depth must be between 1 and 16, got {self.depth}")
        if not 1 <= self.threshold <= COUNTER_MAX:
            raise ValueError(f"threshold must be between 1 and {COUNTER_MAX} (4-bit counters), got {self.threshold}")
        if not 0 <= self.sample_size < 1 << 32:
            raise ValueError(f"sample_size must be between 1 and 2**32 - 1 (0: 10 * width), got {self.sample_size}")

    @property
    def sample(self) -> int:
        """Lookups counted between two agings."""
        return self.sample_size or min(10 * self.width, (1 << 32) - 1)

    @property
    def bytes(self) -> int:
        """The sketch's size in Redis (the string's length; plus Redis's per-key overhead of ~60 bytes)."""
        return 8 + self.counter_bytes

    @property
    def counter_bytes(self) -> int:
        """The bytes of counters, between the lookup count and the aging cursor (two 4-bit counters a byte)."""
        return (self.depth * self.width + 1) // 2

    def counters(self, key: str) -> list[int]:
        """Positions of ``key``'s counters, one per row, in 0..depth*width-1 (row r at r*width + column)."""
        return [row * self.width + column for row, column in enumerate(sketch_columns(key, self.width, self.depth))]

    def key(self, schema: KeySchema, kind: str) -> str:
        """The sketch's Redis key: one per shape (``KeySchema.admission_sketch``)."""
        shape = (self.width, self.depth)
        return schema.admission_sketch(kind, None if shape == SKETCH_SHAPE else shape)

    def observe(self, pipe: Any, schema: KeySchema, kind: str, key: str) -> int:
        args: list[Any] = ["BITFIELD", self.key(schema, kind), "OVERFLOW", "SAT"]
        for position in self.counters(key):
            args += ["INCRBY", "u4", f"#{SKETCH_HEADER_NIBBLES + position}", 1]
        # The aging cursor, read by adding 0: a write, so the first lookup creates the string at its full size.
        args += ["INCRBY", "u32", 0, 1, "INCRBY", "u32", 8 * (4 + self.counter_bytes), 0]
        pipe.execute_command(*args)
        return 1

    def decide(self, replies: list) -> Decision:
        *counts, seen, cursor = replies[0]
        return Decision(min(counts) >= self.threshold, age=seen >= self.sample or cursor > 0)

    def after_miss(
        self,
        schema: KeySchema,
        kind: str,
        key: str,
        decision: Decision,
        live_ttl_s: int,
        *,
        deletes: bool = False,
        epoch: bytes | None = None,
    ) -> tuple[Any, ...] | None:
        if not decision.age:
            return None
        return ("EVAL", _AGE_SKETCH, 1, self.key(schema, kind), self.sample, self.counter_bytes, AGE_STEP_BYTES)

    def evicted(self, reply: Any) -> Sequence[str]:
        return ()

    def refused(self, reply: Any) -> bool:
        return False


# KEYS: hits, main, seq; ARGV: keys (one for a lookup, many for ``observe_all``'s batch). A lookup of a key in
# probation counts a hit; one in the main LRU becomes its most recent, in ARGV's order. Replies how many are tracked.
_TOUCH = """
local tracked = 0
for _, key in ipairs(ARGV) do
  if redis.call('HEXISTS', KEYS[1], key) == 1 then
    redis.call('HINCRBY', KEYS[1], key, 1)
    tracked = tracked + 1
  elseif redis.call('ZSCORE', KEYS[2], key) then
    redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), key)
    tracked = tracked + 1
  end
end
return tracked
"""
TOUCH_BATCH = 1000  # keys one ``_TOUCH`` of ``observe_all`` takes: a script runs whole, other clients wait


# KEYS: small, hits, main, ghost, seq, published, tier; ARGV: key, capacity, most steps, the live values' TTL[, base,
# epoch]. ARGV[6], when given (one server: ARGV[5] set), is the kind's epoch the store in the same round trip compared
# (``cache._STORE``): when ``{prefix}:{kind}:epoch`` is another now and the key has no live value, that store was
# refused (or its value deleted since) and the script does nothing, so a key without a value takes no slot (a value
# there, stored before an invalidation of another key or by another reader since, is admitted: untracked, it would
# live its TTL outside the capacity). Records the capacity and the TTL in the
# ``tier`` hash (``publish.settle_published`` sizes its hand-over by the one and gives what it hands over the other).
# The tier's size is the
# capacity less the published version's keys (``published``, see ``publish.record_published``), its probation and
# ghost sizes ``probation_sizes`` of that. Evicts until a key fits (at most ARGV[3] steps, each moving a
# probation key to the main LRU or evicting one), then inserts ARGV[1]
# (into the main LRU if its name is in the ghost list, else at the tail of probation); a key that still does not
# fit (no room beside the published keys, or a tier still shrinking to a smaller size) is not kept. Replies 0 when
# ARGV[1] was not kept for want of room (the client counts it in ``rejected``), else 1, then the keys that left the
# cache (their values are to be deleted; ARGV[1] itself when not kept). A key already tracked
# (its value expired) stays put. ARGV[5], when not empty, is the kind's ``{prefix}:{kind}:``: the script then deletes
# the live values (and deltas) of the keys that left itself, in the same atomic step, so a client that dies or loses
# its connection before its own delete leaves no value that nothing tracks, and replies only the keys whose delete
# failed (a proxy in front of shards may refuse keys the script did not declare: ``pcall``, so the script never stops
# half-way). Only on one server: on a cluster those keys live in other slots than the script's, and the client
# deletes them (one ``UNLINK`` each, as the reader's ACL grants ``UNLINK`` on live and delta keys in separate
# selectors).
def evictable(pttl_ms: Any, live_ttl_s: int) -> bool:
    """Whether ``probation`` deletes the live value of a key that left its tier, given the value's ``PTTL`` (an
    error, or -2, gone: yes, and its delta with it): not one with more time left than the tier's ``live_ttl_s``,
    or with no expiry, which something else wrote (as ``_ADMIT`` decides on one server)."""
    return not isinstance(pttl_ms, int) or (pttl_ms != -1 and pttl_ms <= live_ttl_s * 1000)


_ADMIT = """
local key, capacity, most, base = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5] or ''
if base ~= '' and ARGV[6] then
  local epoch = redis.pcall('GET', base .. 'epoch')
  if type(epoch) ~= 'table' and (epoch or '') ~= ARGV[6] and not redis.pcall('GET', base .. 'live:' .. key) then
    return {1}
  end
end
redis.call('HSET', KEYS[7], 'capacity', capacity, 'live_ttl_s', ARGV[4])
if redis.call('HEXISTS', KEYS[2], key) == 1 or redis.call('ZSCORE', KEYS[3], key) then return {1} end
local size = capacity - (tonumber(redis.call('GET', KEYS[6])) or 0)
local small_size = math.max(1, math.floor(size / 10))
local ghost_size = math.max(0, size - small_size)
local evicted, steps = {}, 0
local small, main = redis.call('LLEN', KEYS[1]), redis.call('ZCARD', KEYS[3])
while small + main > 0 and small + main >= size and steps < most do
  steps = steps + 1
  if small > 0 and (small >= small_size or main == 0) then
    local oldest = redis.call('LPOP', KEYS[1])
    small = small - 1
    local hits = tonumber(redis.call('HGET', KEYS[2], oldest) or '0')
    redis.call('HDEL', KEYS[2], oldest)
    if hits > 0 then
      redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), oldest)
      main = main + 1
    else
      redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), oldest)
      evicted[#evicted + 1] = oldest
    end
  else
    evicted[#evicted + 1] = redis.call('ZPOPMIN', KEYS[3])[1]
    main = main - 1
  end
end
-- the oldest ghost names beyond ghost_size go, at most ARGV[3] of them: a tier made smaller shrinks its ghost list too
local excess = redis.call('ZCARD', KEYS[4]) - ghost_size
if excess > 0 then redis.call('ZPOPMIN', KEYS[4], math.min(excess, most)) end
local longest = tonumber(ARGV[4]) * 1000
local function undeleted()
  if base == '' then return evicted end
  local left = {}
  for _, name in ipairs(evicted) do
    local ttl = redis.pcall('PTTL', base .. 'live:' .. name)
    -- a value to live longer than the tier stores them (or for good) was written by something else: it stays
    if type(ttl) ~= 'number' or (ttl ~= -1 and ttl <= longest) then
      local value = redis.pcall('UNLINK', base .. 'live:' .. name)
      local delta = redis.pcall('UNLINK', base .. 'delta:' .. name)
      if type(value) ~= 'number' or type(delta) ~= 'number' then left[#left + 1] = name end
    end
  end
  return left
end
local left
if small + main >= size then
  evicted[#evicted + 1] = key
  left = undeleted()
  table.insert(left, 1, 0)
  return left
end
if redis.call('ZREM', KEYS[4], key) == 1 then
  redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), key)
else
  redis.call('RPUSH', KEYS[1], key)
  redis.call('HSET', KEYS[2], key, 0)
end
left = undeleted()
table.insert(left, 1, 1)
return left
"""
# KEYS: main; ARGV: keys of a new version. Its keys leave the main LRU (the version serves them now; their live values
# are to be deleted); replies those that were there. Keys in probation stay until it moves them.
UNTRACK = """
local gone = {}
for _, key in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], key) == 1 then gone[#gone + 1] = key end
end
return gone
"""

# KEYS: published; ARGV: how many keys an invalidation took out of the current version. The count ``_ADMIT`` sizes the
# tier by, less them (never below 0), when one is recorded: the tier gets their slots back now, not at the next publish.
UNPUBLISH = """
local published = tonumber(redis.call('GET', KEYS[1]))
if not published then return -1 end
published = math.max(0, published - tonumber(ARGV[1]))
redis.call('SET', KEYS[1], published)
return published
"""

# KEYS: small, hits, main, ghost, seq, published, tier; ARGV: keys the version before served and the new one does
# not, best first. Keys not tracked enter the main LRU, colder than every key there (the first the warmest of them),
# while the tier has room beside the new version's keys (the capacity ``_ADMIT`` recorded, none before it ran):
# slots that would start empty start with values known to have been wanted, and are the first to go. Replies the
# room left and the keys taken.
HAND_OVER = """
local capacity = tonumber(redis.call('HGET', KEYS[7], 'capacity'))
if not capacity then return {0, {}} end
local room = capacity - (tonumber(redis.call('GET', KEYS[6])) or 0) - redis.call('LLEN', KEYS[1])
  - redis.call('ZCARD', KEYS[3])
local coldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2]
local score = tonumber(coldest) or (tonumber(redis.call('GET', KEYS[5])) or 0) + 1
local taken = {}
for _, key in ipairs(ARGV) do
  if room <= 0 then break end
  if redis.call('HEXISTS', KEYS[2], key) == 0 and not redis.call('ZSCORE', KEYS[3], key) then
    score = score - 1
    redis.call('ZADD', KEYS[3], score, key)
    redis.call('ZREM', KEYS[4], key)
    taken[#taken + 1] = key
    room = room - 1
  end
end
return {room, taken}
"""


def published_order(keys: Collection[Any]) -> list[Any]:
    """A version's keys in the order its publish hands them over: as given when ordered (the caller's ranking,
    best first), else sorted."""
    return list(keys) if isinstance(keys, list | tuple) else sorted(keys)


def hand_over_order(previous: Sequence[Any], published: Collection[Any], tracked: Collection[Any], room: int) -> list:
    """The keys ``HAND_OVER`` moves into the main LRU after a publish, best first: those of the version before
    (``previous``, in its order) that the new one (``published``) does not serve and the tier does not track,
    at most ``room`` of them."""
    taken: dict[Any, None] = {}  # a key listed twice is taken once, as the script finds it tracked the second time
    for key in previous:
        if len(taken) >= room:
            break
        if key not in published and key not in tracked:
            taken[key] = None
    return list(taken)


# A miss moves or evicts at most this many keys: a tier that must shrink by many (a bigger published version) shrinks
# over the next misses, each script staying short.
MAX_STEPS = 64
MAX_KEYS = 2**32  # the most keys one Redis instance holds: a larger capacity means nothing (and Lua writes 1e+20)


def probation_sizes(capacity: int) -> tuple[int, int]:
    """The probation FIFO's size and the ghost list's for a live tier of ``capacity`` keys: a tenth (at least
    one key), and the rest (``_ADMIT`` computes the same in Lua)."""
    small = max(1, capacity // 10)
    return small, max(0, capacity - small)


@dataclass(frozen=True)
class Probation:
    """Keep a kind to ``capacity`` keys in Redis, its published version's and its live tier's together: the live
    tier holds ``capacity`` less the published keys, as a probation FIFO, a main LRU and a ghost list (see the
    module docstring). Every miss is stored; what the policy decides is which keys leave."""

    capacity: int = 100_000
    name = "probation"

    def __post_init__(self) -> None:
        capacity = self.capacity
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or not 1 <= capacity <= MAX_KEYS:
            raise ValueError(
                f"capacity must be a whole number of keys from 1 to 2**32 (the most one Redis holds), got {capacity!r}"
            )
        object.__setattr__(self, "capacity", int(capacity))  # numpy's integers, which redis-py refuses to send

    def observe(self, pipe: Any, schema: KeySchema, kind: str, key: str) -> int:
        _, hits, main, _, seq, *_ = fifo_names(schema, kind)
        pipe.execute_command("EVAL", _TOUCH, 3, hits, main, seq, key)
        return 1

    def decide(self, replies: list) -> Decision:
        return Decision(True)

    def after_miss(
        self,
        schema: KeySchema,
        kind: str,
        key: str,
        decision: Decision,
        live_ttl_s: int,
        *,
        deletes: bool = False,
        epoch: bytes | None = None,
    ) -> tuple[Any, ...] | None:
        if not decision.admit:  # a miss whose value is not stored (None, NaN): nothing to track
            return None
        names = fifo_names(schema, kind)
        base = f"{schema.prefix}:{kind}:" if deletes else ""
        fence = (epoch,) if deletes and epoch is not None else ()
        return ("EVAL", _ADMIT, len(names), *names, key, self.capacity, MAX_STEPS, live_ttl_s, base, *fence)

    def evicted(self, reply: Any) -> Sequence[str]:
        return [name.decode() if isinstance(name, bytes) else str(name) for name in reply[1:]]

    def refused(self, reply: Any) -> bool:
        return bool(reply) and reply[0] == 0


def observe_all(policy: AdmissionPolicy, pipe: Any, schema: KeySchema, kind: str, keys: Sequence[str]) -> int:
    """Queue ``policy``'s lookup commands for every one of ``keys`` on ``pipe`` (whose replies are not read: the live
    values ``get`` and ``get_many`` read, ``cache._observe_live_hits``); ``probation`` touches them in one script per
    ``TOUCH_BATCH`` keys, not one per key (the script's text each time: 93 ms for 5,000 keys). Returns the commands
    queued."""
    if not isinstance(policy, Probation):
        return sum(policy.observe(pipe, schema, kind, key) for key in keys)
    _, hits, main, _, seq, *_ = fifo_names(schema, kind)
    for start in range(0, len(keys), TOUCH_BATCH):
        pipe.execute_command("EVAL", _TOUCH, 3, hits, main, seq, *keys[start : start + TOUCH_BATCH])
    return -(-len(keys) // TOUCH_BATCH)


@functools.lru_cache(maxsize=256)
def fifo_names(schema: KeySchema, kind: str) -> tuple[str, ...]:
    """``probation``'s keys of ``kind`` in ``FIFO_PARTS`` order (small, hits, main, ghost, seq, published, capacity,
    order), built once: every live-tier lookup needs three of them."""
    return tuple(schema.admission_fifo(kind, part) for part in FIFO_PARTS)


def sketch_columns(key: str, width: int, depth: int) -> list[int]:
    """The column of ``key`` in each row: double hashing of its 64-bit BLAKE2b hash (portable to any language).

    ``h = blake2b(utf8(key), digest_size=8)`` read little-endian; ``h1`` its low and ``h2`` its high 32 bits
    with the lowest bit set; row r uses ``(h1 + r * h2) % width``.
    """
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    h1, h2 = h & 0xFFFFFFFF, (h >> 32) | 1
    return [(h1 + row * h2) % width for row in range(depth)]


def admission_policy(spec: str | AdmissionPolicy | None) -> AdmissionPolicy:
    """A policy from its name (default parameters) or a policy itself; None is ``always``."""
    if spec is None or spec == "always":
        return Always()
    if spec == "second_miss":
        return SecondMiss()
    if spec == "frequency":
        return FrequencySketch()
    if spec == "probation":
        return Probation()
    if isinstance(spec, str):
        raise ValueError(f"unknown admission policy {spec!r}: expected one of {', '.join(ADMISSION_NAMES)}")
    if isinstance(spec, type) or getattr(spec, "name", None) not in ADMISSION_NAMES:
        hint = f"; pass an instance, {spec.__name__}(...)" if isinstance(spec, type) else ""
        raise ValueError(f"not an admission policy: {spec!r}{hint}")
    return spec
