"""The package's shape, enforced: the folders follow the data path with no module reaching back up,
pure decision modules import no I/O, and functions fit on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "entrypoint" / "ft_appliance"
PURE = sorted(PKG.glob("policy/*.py")) + [
    PKG / "preflight" / "checks.py",
    PKG / "run" / "command.py",
    PKG / "config" / "topology.py",
]
# What pure modules may import: the standard library's data and text modules, and plain data types.
PURE_ALLOWED = {
    "__future__",
    "bisect",
    "collections.abc",
    "dataclasses",
    "difflib",
    "enum",
    "hashlib",
    "json",
    "math",
    "pathlib",  # Path as a value; nothing here opens it
    "re",
    "sys",  # sys.executable, for the command line
    "typing",
    "ft_appliance.config.args",
    "ft_appliance.config.plan",
    "ft_appliance.config.topology",
    "ft_appliance.errors",
    "ft_appliance.state.records",
    "ft_appliance.preflight.facts",  # the facts' dataclasses
    "ft_appliance.preflight.gpus",
    "ft_appliance.preflight.problems",
}
# package -> the packages it must never import: nothing reaches back up the data path.
FORBIDDEN = {
    "config": {"preflight", "policy", "state", "run", "result", "worker", "tools", "app", "cli", "cli_options"},
    "policy": {"preflight", "run", "result", "worker", "tools", "app", "cli", "cli_options"},
    "state": {"preflight", "run", "result", "worker", "tools", "app", "cli", "cli_options"},
    "preflight": {"stage", "run", "result", "worker", "tools", "app", "cli", "cli_options"},
    "stage": {"run", "result", "worker", "tools", "app", "cli", "cli_options"},
    "run": {"preflight", "worker", "tools", "app", "cli", "cli_options"},
    "result": {"preflight", "run", "worker", "tools", "app", "cli", "cli_options"},
    "worker": {"preflight", "policy", "run", "result", "tools", "app", "cli", "cli_options"},
    "tools": {"app", "cli", "cli_options"},
}
# Leaves that a package above may still use: the records are the typed definition of what crosses a
# process boundary (the plan carries one to the run file), and autotune's and the background saves'
# decisions are pure, taken by the workers where the measurements (timings, free host memory) are.
SHARED_LEAVES = {
    "config": {"ft_appliance.state.records"},
    "worker": {"ft_appliance.policy.autotune", "ft_appliance.policy.saves"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Absolute names of everything a module imports, at any depth of its code."""
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            found.add(mod)
            if not node.module:  # from . import x: x is a module
                found.update(f"{mod}.{a.name}" for a in node.names)
    return found


@pytest.mark.parametrize("path", PURE, ids=lambda p: module_name(p))
def test_pure_modules_import_no_io(path: Path) -> None:
    bad = sorted(m for m in imports(path) if m not in PURE_ALLOWED and m != module_name(path).rsplit(".", 1)[0])
    bad = [m for m in bad if not m.startswith("ft_appliance.policy")]
    assert bad == [], f"{module_name(path)} imports {bad}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_reaches_back_up_the_data_path(package: str) -> None:
    for path in (PKG / package).glob("*.py"):
        names = imports(path) - SHARED_LEAVES.get(package, set())
        reached = {m.split(".")[1] for m in names if m.startswith("ft_appliance.") and m.count(".") >= 1}
        assert not reached & FORBIDDEN[package], f"{module_name(path)} imports {sorted(reached & FORBIDDEN[package])}"


def test_functions_fit_on_a_screen() -> None:
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []


def test_cli_holds_only_the_click_layer() -> None:
    reached = {m for m in imports(PKG / "cli.py") if m.startswith("ft_appliance.")}
    allowed = {
        "ft_appliance",
        "ft_appliance.__version__",
        "ft_appliance.app",  # every command's steps
        "ft_appliance.cli_options",
        "ft_appliance.config.plan",  # the default config path
        "ft_appliance.errors",  # the exit-code table and the one-line mapping
        "ft_appliance.console",  # where the lines go: a bar in place on a terminal
        "ft_appliance.tools.demo",  # the demo layout, built before the demo's plan
    }
    assert reached <= allowed, sorted(reached - allowed)
