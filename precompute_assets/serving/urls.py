"""The user info of a URL, read one way by everything that parses, checks or redacts a URL (stdlib only).

A password whose '@', '/', '?', '#' or ':' was not percent-encoded makes a URL ambiguous, and urllib, libpq and
redis-py each cut it somewhere else; a reader that cut it short showed the rest of the password as a host, a port or
a query. ``split_userinfo`` ends the user info at the first '@' after which the URL reads as what may follow one:
hosts and a path without '@', then a query whose every '@' is in a parameter's value (``?user=me@corp``).
"""

from __future__ import annotations

import re

# One host (a name, an IPv4 address or a bracketed IPv6 address) with an optional numeric port: a Sentinel URL lists
# several, comma-separated. A password's start read as a port ("u:pa" of "u:pa?ss@host") is no number.
_HOST_PORT = re.compile(r"(?:\[[^\[\]/?#@]*\]|[^\[\]:/?#@]*)(?::\d*)?")


def split_userinfo(url: str) -> tuple[str, str | None, str]:
    """``(head, userinfo, rest)`` of ``url``: ``head`` up to and including its '://' ("" without one), the user info
    (None: none) and what follows its '@', so that ``head + userinfo + "@" + rest == url``. Without '://' the whole
    text is read as what follows it (a mistyped ``redis:/u:pw@host``, a bare ``u:pw@host:6379``)."""
    scheme, sep, rest = url.partition("://")
    head, rest = (scheme + sep, rest) if sep else ("", url)
    if _reads_without_userinfo(rest, bool(sep)):
        return head, None, rest
    ats = [index for index, char in enumerate(rest) if char == "@"]
    # The first '@' after which the URL reads whole, a query's '@' after a path only ('u:pw@c?d=e@host': the password
    # is 'pw@c?d=e'); with none such (an '@' in a fragment, a port that is no number), the last: what is taken for
    # the password then is too much, never too little.
    at = next((index for index in ats if _follows_password(rest[index + 1 :])), ats[-1])
    return head, rest[:at], rest[at + 1 :]


def _follows_password(rest: str) -> bool:
    """Whether ``rest``, what follows an '@' of a user info, reads as what follows its password: as a URL after its
    user info, with a path if its query holds an '@' (else that '?' and '@' are as likely the password's)."""
    end = min((rest.index(mark) for mark in "?#" if mark in rest), default=len(rest))
    return _follows_userinfo(rest) and ("@" not in rest[end:] or "/" in rest[:end])


def _reads_without_userinfo(rest: str, url: bool) -> bool:
    """Whether ``rest`` (what follows a URL's '://', ``url``, or a whole text without one) has no user info: no '@', or
    its '@'s are in the values of a URL's query after a path (``host:6379/0?user=me@corp``) or after a host without a
    ':' (``host?key=a@b``: read as user info, it would hold no password). Else a '?' before an '@' is as likely a
    password's as a query's: without a path ``u:2024?a=b@host`` is host 'u', port 2024 as well as the password
    '2024?a=b', and without '://' (``redis:/u:pa?s=s@host``) there is no path. It is taken for the password (libpq
    takes it so too: to the first '@' before a '/'), so that it is hidden and refused rather than shown."""
    end = min((rest.index(mark) for mark in "?#" if mark in rest), default=len(rest))
    located = rest[:end]
    return "@" not in rest or (url and ("/" in located or ":" not in located) and _follows_userinfo(rest))


def _follows_userinfo(rest: str) -> bool:
    """Whether ``rest`` reads as what follows a URL's user info: hosts[:port] and a path without '@', then a query whose
    every '@' is in a parameter's value, and a fragment without '@'."""
    end = min((rest.index(mark) for mark in "?#" if mark in rest), default=len(rest))
    located, tail = rest[:end], rest[end:]
    authority = located.partition("/")[0]
    if "@" in located or not all(_HOST_PORT.fullmatch(host) for host in authority.split(",")):
        return False
    query, _, fragment = tail[1:].partition("#") if tail.startswith("?") else ("", "", tail[1:])
    return "@" not in fragment and all("@" not in piece.partition("=")[0] for piece in re.split("[&;]", query))


def tls_hint(url: str) -> str:
    """What to add to "does not answer" for a TLS URL (``rediss://``): a plain Redis on its port accepts the connection
    and waits for a command while the client waits for a TLS handshake, so a scheme mistake looks like a hung server."""
    if url.partition("://")[0].lower() != "rediss":
        return ""
    return "; no TLS handshake came back: a server without TLS takes redis://, not rediss://"


_PASSWORD_PARAM = re.compile(r"(?i)(\b(?:ssl_?|sentinel_)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&#;]*)")
# A password with spaces (a passphrase, unencoded): a word 'scheme://user:...' without an '@' runs on across them to
# the line's last '@', as the user info it then is (or, after a host:port, prose up to an '@' is hidden with it).
_SPACED_USERINFO = re.compile(r"\S*://[^\s/?#@:]*:[^\s@]*\s.*@\S*")


def redact(url: str) -> str:
    """The URL (or libpq ``key=value`` string, or an error message that holds some) with every password replaced by
    ***: in the user info of each word as ``serving.urls.split_userinfo`` reads it (a mistyped or missing ``://``, an
    '@', '?' or '#' in the password too; with spaces, across them), and in ``password=`` parameters
    (``redis://host/0?password=...``, ``host=h password=...``). Else not across whitespace, so that prose in an error
    message is left alone."""
    shown = _SPACED_USERINFO.sub(lambda spaced: _without_userinfo_password(spaced.group()), url)
    return _PASSWORD_PARAM.sub(r"\1***", re.sub(r"\S+", lambda word: _without_userinfo_password(word.group()), shown))


def _without_userinfo_password(word: str) -> str:
    """``word`` with the password of its user info, if it has one, replaced by ***."""
    head, userinfo, rest = split_userinfo(word)
    user, colon, _ = (userinfo or "").partition(":")
    return f"{head}{user}:***@{rest}" if colon else word
