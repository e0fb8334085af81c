"""Imports point one way: the tree shows the architecture, and a test keeps it that way."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "precompute_assets"

# What each part of the package may import from the package itself (besides its own modules).
ALLOWED_INTERNAL = {
    "serving": set(),
    "ml": {"serving"},
    "storage": {"serving", "ml"},  # ml.features: the ad feature set that validates stored ads
    "workload": {"serving", "ml"},
    "sync": {"serving", "ml", "storage"},
    "stack": {"storage", "serving"},
    "defs": {"serving", "ml", "storage", "sync", "workload", "stack"},
    "definitions": {"defs"},
    "tools": {"serving", "ml", "storage", "sync", "workload", "stack", "defs", "definitions"},
}
NO_DAGSTER = {"serving", "ml", "storage", "workload", "sync", "stack"}
SERVING_THIRD_PARTY = {"redis", "numpy", "hiredis"}


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py") if relative.parts[0] != "__init__.py" else "__init__"


def imports_of(path: Path) -> set[str]:
    """Absolute dotted names of every module imported anywhere in the file (function-level imports too)."""
    module = ".".join(("precompute_assets", *path.relative_to(PACKAGE).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if part_of(p) != "__init__")


def test_every_part_is_covered() -> None:
    assert {part_of(p) for p in MODULES} == set(ALLOWED_INTERNAL)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path: Path) -> None:
    part = part_of(path)
    internal = {name.split(".")[1] for name in imports_of(path) if name.startswith("precompute_assets.")}
    wrong = internal - ALLOWED_INTERNAL[part] - {part}
    assert not wrong, f"{path.name} ({part}/) imports {sorted(wrong)}"
    external = {name.split(".")[0] for name in imports_of(path)} - {"precompute_assets"}
    if part in NO_DAGSTER:
        assert not {n for n in external if n.startswith("dagster")}, f"{path.name} imports dagster"
    if part == "serving":
        extra = external - SERVING_THIRD_PARTY - set(sys.stdlib_module_names) - {"__future__"}
        assert not extra, f"serving/{path.name} imports {sorted(extra)}: only redis, numpy and the stdlib"


def test_the_checker_sees_relative_and_nested_imports(tmp_path: Path) -> None:
    """The checker itself must catch a violation, or the test above could never fail."""
    names = imports_of(PACKAGE / "sync" / "embeddings.py")
    assert "precompute_assets.storage.documents" in names
    assert "precompute_assets.serving.publish" in names
    assert "precompute_assets.storage.documents" in imports_of(PACKAGE / "tools" / "cli.py")


def test_the_code_location_loads_without_torch() -> None:
    """torch is imported where the LSTM is built, trained or loaded, never by loading the Definitions: the code
    server and every run's process (a predictive task run waits for it) start about 1.3 s sooner."""
    import subprocess

    code = "import sys, precompute_assets.definitions as d; d.defs(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr[-2000:]


def test_the_code_location_loads_without_sklearn() -> None:
    """scikit-learn is imported where a forest or a baseline is trained or scored, never by loading the Definitions:
    it was about a second of every code-server start, reload and run process."""
    import subprocess

    code = "import sys, precompute_assets.definitions as d; d.defs(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr[-2000:]


def test_the_serving_package_names_its_submodules_as_it_did_before_its_lazy_imports() -> None:
    """``serving`` imports its public names on first use: ``serving.invalidate.invalidate(...)``, as the README writes
    it, failed with "module 'precompute_assets.serving' has no attribute 'invalidate'" where it had worked (the eager
    imports had made the submodules attributes), still without importing numpy for the package alone."""
    import subprocess

    code = (
        "import sys\nfrom precompute_assets import serving\nlight = 'numpy' not in sys.modules\n"
        "found = [serving.invalidate.invalidate, serving.publish.settle_published, serving.querylog.expand_entries, "
        "serving.stats.cache_stats, serving.rerank.rerank, serving.PredictionCache]\n"
        "print(light, all(found), hasattr(serving, 'no_such_module'), hasattr(serving, '_MODULES'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True True False True", out.stdout + out.stderr[-2000:]
    listed = "from precompute_assets import serving\nprint(set(serving.__all__) <= set(dir(serving)))"
    out = subprocess.run([sys.executable, "-c", listed], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True", out.stdout + out.stderr[-2000:]  # before any of them is used
