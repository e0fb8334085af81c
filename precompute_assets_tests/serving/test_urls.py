"""One reading of a URL's user info (``split_userinfo``) for hostile URLs: passwords whose '@', '/', '?', '#' or ':'
was not percent-encoded, '@' in query values, IPv6 hosts, several sentinels, no scheme."""

from __future__ import annotations

import pytest

from precompute_assets.serving.urls import split_userinfo

CASES = [
    # (url, userinfo, rest)
    ("redis://u:pw@host:6379/0", "u:pw", "host:6379/0"),
    ("redis://u@host:6379/0", "u", "host:6379/0"),
    ("redis://:pw@host:6379/0", ":pw", "host:6379/0"),
    ("redis://host:6379/0", None, "host:6379/0"),
    ("redis://u:s3%40cr@host/0", "u:s3%40cr", "host/0"),
    ("redis://u:s3@cr@host/0", "u:s3@cr", "host/0"),
    ("redis://u:s3/cr@host/0", "u:s3/cr", "host/0"),
    ("redis://u:s3?cr@host/0", "u:s3?cr", "host/0"),
    ("redis://u:s3#cr@host/0", "u:s3#cr", "host/0"),
    ("redis://u:s3:cr@host/0", "u:s3:cr", "host/0"),
    ("redis://u:s3@c?r@host/0", "u:s3@c?r", "host/0"),  # an '@' and then a '?'
    ("redis://u:s3?c@r@host/0", "u:s3?c@r", "host/0"),  # a '?' and then an '@'
    ("redis://:pw@[::1]:6379/0", ":pw", "[::1]:6379/0"),
    ("redis://[::1]:6379/0", None, "[::1]:6379/0"),
    ("rediss://u:pw@host:6380/0?ssl_cert_reqs=none", "u:pw", "host:6380/0?ssl_cert_reqs=none"),
    ("unix:///tmp/redis.sock?password=s3cr&db=0", None, "/tmp/redis.sock?password=s3cr&db=0"),
    ("unix://u:pw@/tmp/redis.sock?db=0", "u:pw", "/tmp/redis.sock?db=0"),
    ("redis://host:6379/0?password=s3c@r", None, "host:6379/0?password=s3c@r"),
    ("redis://host/0?client_name=a@b&password=s3c@r#x", None, "host/0?client_name=a@b&password=s3c@r#x"),
    ("postgresql://db.example/app?user=me@corp", None, "db.example/app?user=me@corp"),
    ("postgresql://u:pw@db.example/app?user=me@corp", "u:pw", "db.example/app?user=me@corp"),
    ("redis+sentinel://u:pw@s1:26379,s2:26380,[::1]:7/m/1", "u:pw", "s1:26379,s2:26380,[::1]:7/m/1"),
    ("redis+sentinel://u:s3?cr@s1,s2/m?sentinel_password=p@ss", "u:s3?cr", "s1,s2/m?sentinel_password=p@ss"),
    ("u:pw@host:6379", "u:pw", "host:6379"),  # no scheme
    (":pw@host:6379", ":pw", "host:6379"),
    ("redis:/u:pw@host:6379/0", "redis:/u:pw", "host:6379/0"),  # a mistyped '://'
    ("redis//u:s3?cr@host:6379/0", "redis//u:s3?cr", "host:6379/0"),
    ("u:pw@host/0#frag@x", "u:pw@host/0#frag", "x"),  # nothing reads whole: the last '@'
]


@pytest.mark.parametrize(("url", "userinfo", "rest"), CASES)
def test_split_userinfo_reads_hostile_urls(url: str, userinfo: str | None, rest: str) -> None:
    head, found, after = split_userinfo(url)
    assert (found, after) == (userinfo, rest)
    assert head + ("" if found is None else found + "@") + after == url
