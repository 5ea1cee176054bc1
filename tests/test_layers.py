"""The package's shape: no import cycle, each module imports only from its own layer or the ones below,
and nothing below the command line and the web loads Flask or click."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import newsletter

PACKAGE = Path(newsletter.__file__).parent
LAYERS = {
    "core": {
        "config",
        "db",
        "models",
        "tokens",
        "text",
        "sanitize",
        "messages",
        "mailer",
        "signing",
        "ratelimit",
        "resources",
        "runtime",
        "threads",
        "i18n",
    },
    "services": {
        "subscriptions",
        "signups",
        "roster",
        "imports",
        "install",
        "transfer",
        "posts",
        "feeds",
        "dispatch",
        "couriers",
        "digests",
        "categories",
        "archive",
        "manage",
        "outbox",
        "publish",
        "inbound",
        "worker",
        "stats",
        "checks",
        "serving",
        "demo",
    },
    "adapters": {"cli", "web"},
}
RANK = {name: rank for rank, layer in enumerate(LAYERS.values()) for name in layer}
WEB_AND_TERMINAL = ("flask", "flask_wtf", "werkzeug", "click")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules NAME imports, anywhere in it (a deferred import inside a function counts too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(name, path, known) for name, path in found.items()}


def area(module: str) -> str:
    """The top-level part of the package a module belongs to: `newsletter.cli.base` -> `cli`."""
    return module.split(".")[1] if module.count(".") else ""


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in modules() if area(m) and area(m) not in RANK)
    assert not unplaced, f"put these modules in a layer of tests/test_layers.py: {unplaced}"


def test_the_readme_says_what_every_module_does() -> None:
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    sections: dict[str, str] = {}  # the tree's entries: "cli/", "web/", "(services)", "(core)" ...
    for line in readme.split("## Development", 1)[1].split("```")[1].splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            key = line.split()[0]
        if line.startswith("  "):
            sections[key] = sections.get(key, "") + line
    missing = []
    for name, path in modules().items():
        parts = name.split(".")
        where = f"{parts[1]}/" if len(parts) == 3 else "(services)" if RANK.get(area(name)) == 1 else "(core)"
        if path.name != "__init__.py" and not re.search(rf"\b{re.escape(path.name)}", sections.get(where, "")):
            missing.append(name)
    assert not missing, f"say what these modules do in README.md's Development section: {missing}"


def test_no_import_cycle() -> None:
    edges = {m: {t for t in targets if t in modules()} for m, targets in graph().items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target] if target in path else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_modules_import_only_from_their_layer_or_below() -> None:
    upward = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in graph().items()
        for target in targets
        if target.startswith("newsletter.") and area(module) in RANK and RANK[area(target)] > RANK[area(module)]
    ]
    assert not upward, "\n".join(upward)


def test_nothing_imports_from_the_command_line() -> None:
    borrowers = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if area(target) == "cli" and area(module) != "cli"
    ]
    assert not borrowers, "\n".join(borrowers)


def test_the_command_line_runs_no_query_of_its_own() -> None:
    """Queries, rules and orchestration live in the services; a command parses, calls one and prints."""
    queries = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if area(module) == "cli" and target.split(".")[0] == "sqlalchemy"
    ]
    assert not queries, "\n".join(queries)


def test_core_and_services_know_nothing_of_flask_or_click() -> None:
    offenders = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if area(module) in RANK and RANK[area(module)] < RANK["cli"] and target.split(".")[0] in WEB_AND_TERMINAL
    ]
    assert not offenders, "\n".join(offenders)


def test_the_command_line_and_the_engine_load_without_flask() -> None:
    """What `newsletter send` imports leaves Flask and the DKIM library (dkimpy, which loads dnspython)
    unloaded: they cost start-up time, and only the web pages and a send with [dkim] set use them."""
    below_web = sorted(m for m in modules() if area(m) in RANK and area(m) != "web")
    web = [*WEB_AND_TERMINAL[:3], "dkim", "dns"]
    code = (
        "import sys\n"
        f"for m in {below_web!r}: __import__(m)\n"
        f"print([m for m in sys.modules if m.split('.')[0] in {web!r}])"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded


def layer_of(module: str) -> str:
    return next(layer for layer, names in LAYERS.items() if area(module) in names)
