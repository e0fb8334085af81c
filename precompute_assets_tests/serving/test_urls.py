"""One reading of a URL's user info (``split_userinfo``) for hostile URLs: passwords whose '@', '/', '?', '#' or ':'
was not percent-encoded, '@' in query values, IPv6 hosts, several sentinels, no scheme."""

from __future__ import annotations

import pytest

from precompute_assets.ml.embedding_service import _without_credentials
from precompute_assets.serving.connection import check_url_port, parse_sentinel_url
from precompute_assets.serving.urls import split_userinfo
from precompute_assets.stack import redact, url_error, url_problem
from precompute_assets.storage.postgres import userinfo_problem, without_password

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
    # a password's '?' before what reads as a query's value with an '@': without a path, it is the password's
    ("redis://u:2024?a=b@host:6379/0", "u:2024?a=b", "host:6379/0"),
    ("postgresql://u:?a=b@db.example/app", "u:?a=b", "db.example/app"),
    ("redis:/u:pa?s=s@host:6379/0", "redis:/u:pa?s=s", "host:6379/0"),  # and without '://', without a path
    ("https://embed.example?key=a@b", None, "embed.example?key=a@b"),  # no ':', so no password: a query
    ("redis://u:s3@c?r=x@host/0", "u:s3@c?r=x", "host/0"),  # an '@', a '?' and an '=' in the password
    ("redis://u:s3@cr@host:6379?client_name=a@b", "u:s3@cr@host:6379?client_name=a", "b"),  # no path: too much
]


@pytest.mark.parametrize(("url", "userinfo", "rest"), CASES)
def test_split_userinfo_reads_hostile_urls(url: str, userinfo: str | None, rest: str) -> None:
    head, found, after = split_userinfo(url)
    assert (found, after) == (userinfo, rest)
    assert head + ("" if found is None else found + "@") + after == url


# (url, password): every reader of a URL's user info must agree on where it ends, and none may show the password.
HOSTILE = [
    ("redis://app:S3cr@et@cache.example:6379/0", "S3cr@et"),
    ("redis://app:S3cr/et@cache.example:6379/0", "S3cr/et"),
    ("redis://app:S3cr?et@cache.example:6379/0", "S3cr?et"),
    ("redis://app:S3cr#et@cache.example:6379/0", "S3cr#et"),
    ("redis://app:S3cr:et@cache.example:6379/0", "S3cr:et"),
    ("redis://app:S3cr@e?tX@cache.example:6379/0", "S3cr@e?tX"),
    ("redis://app:S3cr?e@tX@cache.example:6379/0", "S3cr?e@tX"),
    ("redis://:S3cr%40et@[::1]:6379/0", "S3cr%40et"),
    ("rediss://app:S3cr?et@cache.example:6380/0?ssl_cert_reqs=required", "S3cr?et"),
    ("unix://app:S3cr@et@/run/redis.sock?db=0", "S3cr@et"),
    ("postgresql://app:S3cr%zz?et@db.example:5432/app?user=me@corp", "S3cr%zz?et"),
    ("postgresql+psycopg2://app:S3cr#et@db.example/app", "S3cr#et"),
    ("http://app:S3cr@e?tX@embed.example:8080/v1/embeddings?user=me@corp", "S3cr@e?tX"),
    ("redis+sentinel://app:S3cr@et@s1:26379,s2:26380,[::1]:7/m/1", "S3cr@et"),
    ("redis+sentinel://app:S3cr/e@tX@s1:26379/m?sentinel_password=p@ss", "S3cr/e@tX"),
    ("redis+sentinel://app:S3cr?et@s1:26379/m?sentinel_password=p@ss", "S3cr?et"),
    ("app:S3cr?et@cache.example:6379", "S3cr?et"),
    ("redis://app:2024?Sum=mer@cache.example:6379/0", "2024?Sum=mer"),
    ("postgresql://app:?S3cr=et@db.example:5432/app", "?S3cr=et"),
    ("redis//app:S3cr?e=t@cache.example:6379/0", "S3cr?e=t"),
    ("redis://app:S3c!@Hm?[Yo=XJ@cache.example:6379/0", "S3c!@Hm?[Yo=XJ"),
]


@pytest.mark.parametrize(("url", "password"), HOSTILE)
def test_the_five_readers_of_a_user_info_agree_and_never_show_its_password(url: str, password: str) -> None:
    head, userinfo, rest = split_userinfo(url)
    assert userinfo is not None and userinfo.partition(":")[2] == password
    shown = redact(url)  # password= parameters are hidden too
    assert (
        shown.startswith(f"{head}{userinfo.partition(':')[0]}:***@{rest.partition('?')[0]}") and password not in shown
    )
    without = _without_credentials(url)  # query values are hidden too
    assert without.startswith(head + rest.partition("#")[0].partition("?")[0]) and password not in without
    assert without_password(f"libpq quoted {password!r}", url) == (
        "libpq quoted '***'" if head else f"libpq quoted {password!r}"
    )
    assert (userinfo_problem(url) is not None) == (bool(head) and ("@" in userinfo or "/" in userinfo))
    try:
        sentinel = parse_sentinel_url(url)
    except ValueError as refused:
        assert "percent-encode" in str(refused) and password not in str(refused), refused
    else:
        assert sentinel is None or (sentinel.password, sentinel.sentinels[0][0]) == (password, "s1")


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:2024?Summer@127.0.0.1:6379/0",
        "rediss://app:2024#Summer@cache.example/0",
        "redis://app:2024?Sum=mer@127.0.0.1:6379/0",  # what follows the '?' reads as a parameter
    ],
)
def test_a_password_whose_start_reads_as_a_port_is_refused_without_it(url: str) -> None:
    """urllib and redis-py end the authority at a password's '?' or '#': 'app:2024?Summer' passed as host 'app', port
    2024, and the step failed with 'does not answer: Error connecting to app:2024', the password's start."""
    import dagster as dg

    from precompute_assets.defs.resources import RedisResource

    with pytest.raises(ValueError, match="percent-encoded") as refused:
        check_url_port(url)
    assert "2024" not in str(refused.value), refused.value
    problem = url_error("PRECOMPUTE_REDIS_URL", url)
    assert problem is not None and "percent-encoded" in problem and "2024" not in problem, problem
    with pytest.raises(dg.Failure) as failure:
        RedisResource(url=url).client()
    assert "is not a Redis URL" in failure.value.description and "2024" not in failure.value.description


@pytest.mark.parametrize(
    "url",
    [
        "unix://app:QZ?wj=6bXJ@/run/redis.sock?db=0",
        "redis://app:QZ?wj=6bXJ@cache.example:6379/0",
        "rediss://:QZ1?a=b&c=dXJ@cache.example/0",
    ],
)
def test_a_password_read_as_a_query_is_not_named_as_an_unknown_parameter(url: str) -> None:
    """The check of a Redis URL's parameters read them as urllib does, from a password's '?': `status` named
    'wj' and '6bXJ@/run/redis.sock?db' as parameters redis-py does not take, the password's rest."""
    problem = url_problem("PRECOMPUTE_REDIS_URL", url)
    assert problem is not None and "QZ" not in problem and "XJ" not in problem, problem
