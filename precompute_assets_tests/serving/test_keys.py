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
