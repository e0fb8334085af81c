"""The key schema and codecs are a contract: pin them."""

import pytest

from precompute_assets.serving.keys import KeySchema, Pointer, bucket_of, check_kind, codec_for


def test_key_layout_is_stable():
    schema = KeySchema("pc")
    assert schema.pointer("ctr") == "pc:1:ctr:current"
    assert schema.bucket("ctr", "20261121", 7) == "pc:1:ctr:20261121:7"
    assert schema.live("ctr", "ad1") == "pc:1:ctr:live:ad1"
    assert schema.query_log() == "pc:1:qlog"
    assert schema.stats("ctr") == "pc:1:stats:ctr"


def test_bucket_is_crc32_mod_buckets():
    assert bucket_of("ad000001", 64) == 4179198825 % 64  # zlib.crc32(b"ad000001")


def test_codecs_round_trip():
    assert codec_for("ctr").encode(0.5) == b"\x00\x00\x00?"
    assert codec_for("ctr").decode(codec_for("ctr").encode(0.125)) == 0.125
    assert codec_for("other").decode(codec_for("other").encode({"a": [1, 2]})) == {"a": [1, 2]}


def test_pointer_round_trip_and_bad_kind():
    assert Pointer.decode(Pointer("2026-11-21.1", 12).encode()) == Pointer("2026-11-21.1", 12)
    with pytest.raises(ValueError, match="invalid kind"):
        check_kind("Bad Kind")


def test_names_with_a_trailing_newline_are_rejected():
    from precompute_assets.serving.keys import check_version

    with pytest.raises(ValueError):
        check_kind("ctr\n")
    with pytest.raises(ValueError):
        check_version("v1\n")


# --- input that could reach across namespaces is refused ---------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    ["ctr:live", "ctr:v1", "Ctr", "ctr{x}", "{ctr}", "ctr*", "", "c" * 65, "stats", "qlog", 7, None],
)
def test_kinds_that_could_collide_are_refused(kind):
    schema = KeySchema("pc")
    with pytest.raises(ValueError, match="invalid kind"):
        check_kind(kind)
    for build in (schema.pointer, schema.experiment, schema.admission_sketch):
        with pytest.raises(ValueError, match="invalid kind"):
            build(kind)
    with pytest.raises(ValueError, match="invalid kind"):
        schema.admission_fifo(kind, "main")
    with pytest.raises(ValueError, match="invalid kind"):
        schema.live(kind, "k")
    with pytest.raises(ValueError, match="invalid kind"):
        schema.bucket(kind, "v1", 0)


def test_the_stats_kind_would_have_been_the_stats_of_kind_current():
    # Why "stats" is reserved: its pointer would be the hit/miss counters of a kind named "current".
    assert KeySchema("pc").stats("current") == "pc:1:stats:current"
    with pytest.raises(ValueError, match="shared 'stats' keys"):
        KeySchema("pc").pointer("stats")


@pytest.mark.parametrize(
    "version",
    [
        "live",
        "LIVE",
        "current",
        "experiment",
        "sketch",
        "seen",
        "fifo",
        "v1:2",
        "v{1}",
        "{v1}",
        "v 1",
        "",
        "v" * 65,
        "v1\n",
    ],
)
def test_versions_that_could_collide_are_refused(version):
    from precompute_assets.serving.keys import check_version

    with pytest.raises(ValueError, match="invalid version"):
        check_version(version)


def test_probation_state_shares_one_hash_tag_per_kind():
    from precompute_assets.serving.connection import key_slot
    from precompute_assets.serving.keys import FIFO_PARTS

    schema = KeySchema("pc")
    assert schema.admission_fifo("ctr", "main") == "pc:1:ctr:fifo:{pc:1:ctr}:main"
    assert len({key_slot(schema.admission_fifo("ctr", part)) for part in FIFO_PARTS}) == 1
    with pytest.raises(ValueError, match="unknown probation part"):
        schema.admission_fifo("ctr", "live")


def test_version_live_would_overwrite_live_values():
    # Why "live" is reserved: bucket 0 of version "live" is the live value of prediction key "0".
    schema = KeySchema("pc")
    assert schema.bucket("ctr", "live", 0) == schema.live("ctr", "0")


@pytest.mark.parametrize(
    "key",
    ["", "x" * 257, "a\nb", "a\rb", "a\x00b", "tab\tkey", "del\x7f", "{tag}", "ad{1}", "ad}", "\ud800", None, 5],
)
def test_prediction_keys_that_could_escape_are_refused(key):
    from precompute_assets.serving.keys import check_key, check_keys

    schema = KeySchema("pc")
    with pytest.raises(ValueError, match="invalid prediction key"):
        check_key(key)
    with pytest.raises(ValueError, match="invalid prediction key"):
        check_keys(["ok", key])
    with pytest.raises(ValueError, match="invalid prediction key"):
        schema.live("ctr", key)
    with pytest.raises(ValueError, match="invalid prediction key"):
        schema.admission_seen("ctr", key)


def test_ordinary_keys_stay_under_their_kinds_prefix():
    from precompute_assets.serving.connection import key_slot
    from precompute_assets.serving.keys import MAX_KEY_LENGTH, check_keys

    schema = KeySchema("pc")
    keys = ["ad1", "tenant:ad1", "ctr:current", "x" * MAX_KEY_LENGTH, "é-ü 1", "a/b?c=d"]
    check_keys(keys)
    for key in keys:
        assert schema.live("ctr", key).startswith("pc:1:ctr:live:")
        assert schema.admission_seen("ctr", key).startswith("pc:1:ctr:seen:")
    # Without braces, a live key's cluster slot is the hash of its whole name, like every other key.
    name = schema.live("ctr", "ad1")
    assert key_slot(name) != key_slot("ad1")


@pytest.mark.parametrize("namespace", ["", "pc:1", "{pc}", "p c", "pc*", "p" * 65])
def test_namespaces_that_could_collide_are_refused(namespace):
    with pytest.raises(ValueError, match="invalid namespace"):
        KeySchema(namespace)


@pytest.mark.parametrize("raw", [b"v1", b"v1:x", b"v1:0", b"live:3", b"v:1:2", b":4", b"v1:\xc2\xb2", b"v1:4000000000"])
def test_malformed_pointers_are_refused(raw):
    """v1:4000000000 was a version whose buckets cache stats and invalidate --prefix walked for hours (h_diff)."""
    with pytest.raises(ValueError):
        Pointer.decode(raw)
    assert Pointer.decode(b"v1:16777216").buckets == 16777216  # MAX_BUCKETS: a billion keys
