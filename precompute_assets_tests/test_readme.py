"""The README renders: its links stay inside the repository, and no table is cut by a blank line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_links_point_inside_the_repository() -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if re.match(r"[a-z]+://|#", target):
            continue
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"README links to {target}"
    assert "../" not in README, "the README refers to a path outside the repository"


def test_tables_are_not_cut_by_blank_lines() -> None:
    lines = README.splitlines()
    for number, (before, blank, after) in enumerate(zip(lines, lines[1:], lines[2:], strict=False), start=2):
        cut = before.startswith("|") and not blank.strip() and after.startswith("|")
        assert not cut, f"README line {number}: a blank line inside a table"


def test_the_key_table_names_every_key_of_the_key_schema() -> None:
    """The README's table of Redis keys lists each key ``serving.keys`` documents (the invalidation epoch, added to
    the code's table, was missing from the README's)."""
    from precompute_assets.serving import keys

    def names(pattern: str, text: str) -> set[str]:
        return {re.sub(r":(\*|\{part\})$", "", key) for key in re.findall(pattern, text, re.MULTILINE)}

    documented = names(r"^``(pc:1:[^`]+)``", keys.__doc__)
    assert len(documented) >= 10, documented  # the code's table was read
    assert documented - names(r"^\| `(pc:1:[^`]+)` \|", README) == set()


VARIABLE = re.compile(r"(PRECOMPUTE|DAGSTER)_[A-Z0-9_]+")


def variables_read() -> set[str]:
    """Every environment variable name the package holds as a whole string (its ``ENV_*`` constants, the literals
    handed to ``os.environ``, ``EnvVar``), and those ``dagster.yaml`` reads: every read goes through one of them."""
    import tokenize

    # Tokens, not ast.parse: CPython 3.11's AST constructor counts its recursion in state other threads share, and a
    # leftover thread of an earlier test compiling meanwhile failed this test ("recursion depth mismatch").
    names = set()
    for path in (ROOT / "precompute_assets").rglob("*.py"):
        with path.open("rb") as source:
            strings = [token.string for token in tokenize.tokenize(source.readline) if token.type == tokenize.STRING]
            for string in strings:
                quoted = re.fullmatch(r"""[rRuU]?(["'])(.*)\1""", string)
                if quoted and VARIABLE.fullmatch(quoted.group(2)):
                    names.add(quoted.group(2))
    return names | set(re.findall(r"^\s*env: (\S+)$", (ROOT / "dagster.yaml").read_text(), re.MULTILINE))


def settings_table() -> set[str]:
    """The variables the README's Configuration table lists."""
    section = README[README.index("## Configuration") :]
    table = section[section.index("| variable |") :].split("\n\n")[0]
    return set(re.findall(r"^\| `([A-Z0-9_]+)` \|", table, re.MULTILINE))


def test_the_settings_table_names_every_variable_the_package_reads() -> None:
    """`redis acl`'s admin URL and passwords were read but missing from the table a deployment is configured by."""
    read = variables_read()
    assert {"DAGSTER_HOME", "DAGSTER_PG_URL", "PRECOMPUTE_CAMPAIGN_MAX_ADS", "PRECOMPUTE_TRACEBACK"} <= read  # scanned
    assert read - settings_table() == set()


# The variables `precompute env` does not export, and why: the rest it exports, always or where they are set.
NOT_EXPORTED = {
    "PRECOMPUTE_REDIS_ADMIN_URL": "a credential of one administrative command",
    "PRECOMPUTE_REDIS_PUBLISHER_PASSWORD": "a secret",
    "PRECOMPUTE_REDIS_READER_PASSWORD": "a secret",
    "PRECOMPUTE_EMBEDDING_API_KEY": "a secret",
    "PRECOMPUTE_MODEL_KEY": "a secret",
    "PRECOMPUTE_EXPERIMENT": "read by the code location alone, from its own environment",
    "PRECOMPUTE_EXPERIMENT_SALT": "read by the code location alone",
    "PRECOMPUTE_EXECUTOR": "read by the code location alone",
    "PRECOMPUTE_CELERY_BROKER_URL": "read by the code location alone",
    "PRECOMPUTE_CELERY_BACKEND_URL": "read by the code location alone",
    "PRECOMPUTE_EMBEDDING_URL": "read by the code location alone",
    "PRECOMPUTE_REDIS_MAXMEMORY": "read by `up` as it starts the embedded Redis",
    "PRECOMPUTE_REDIS_SERVER": "read by `up` as it starts the embedded Redis",
    "PRECOMPUTE_SERVICE_ROOT": "read by `up` as it starts the embedded PostgreSQL",
    "PRECOMPUTE_TRACEBACK": "a switch of one command's error output",
}
SHARED_VALUES = {"PRECOMPUTE_AD_NUMERIC": "quality,bid", "PRECOMPUTE_AD_CATEGORICAL": "category",
                 "PRECOMPUTE_AD_LOG_SCALED": "bid", "PRECOMPUTE_CAMPAIGN_MAX_ADS": "500"}  # fmt: skip


def test_env_exports_every_variable_but_the_secrets_and_those_read_only_where_they_are_set(
    tmp_path, monkeypatch, capsys
) -> None:
    """`env` did not export PRECOMPUTE_CAMPAIGN_MAX_ADS, which `campaign register` reads as the Definitions do. A
    variable the package reads is either exported (always, or where it is set) or listed above with its reason."""
    from precompute_assets.tools.cli import main, shared_settings

    def exported() -> set[str]:
        assert main(["env"]) == 0
        return set(re.findall(r"^export ([A-Z0-9_]+)=", capsys.readouterr().out, re.MULTILINE))

    for name in variables_read() - set(NOT_EXPORTED):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    always = exported()
    assert set(SHARED_VALUES) == set(shared_settings()) and not always & set(SHARED_VALUES)
    for name, value in SHARED_VALUES.items():
        monkeypatch.setenv(name, value)
    assert exported() == always | set(SHARED_VALUES)
    assert variables_read() - set(NOT_EXPORTED) == always | set(SHARED_VALUES)


def test_the_serving_snippet_runs_as_written(redis_server, monkeypatch) -> None:
    """The service snippet named a Redis on 6379 with no password (the embedded one is neither) and a `model` it
    never defined: run as written it warned, missed, then failed with a NameError. A private server: the snippet
    logs its queries to the default namespace's stream, which other tests replay hours into."""
    block = README.split("## Using the cache from a service", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", redis_server().url)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert scope["ctr"] == pytest.approx(0.01) and scope["q"].hit is True  # the computed value, as float32
    scope["cache"].close()
