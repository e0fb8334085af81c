"""The README renders: its links stay inside the repository, and no table is cut by a blank line."""

from __future__ import annotations

import re
from pathlib import Path

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
