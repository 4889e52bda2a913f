"""The layers of docs/architecture.md, enforced: each package or top-level module of megatron_srft imports only
from layers below its own (lazy imports inside functions count too), so the dependency graph has no cycle and the
core never imports the tools (check/, experiments/) or the command line (cli/).

The layers are read from the ```layers block of docs/architecture.md, so the diagram cannot drift from the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_srft"


def documented_layers() -> list[set[str]]:
    """The ```layers block of docs/architecture.md, top layer first: one line per layer, units separated by spaces."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    return [set(line.split()) for line in block.group(1).splitlines() if line.strip()]


def unit_of(module: str) -> str:
    """megatron_srft.training.loop -> training; megatron_srft.config -> config; megatron_srft -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the files where that import is written, across units only."""
    edges: dict[tuple[str, str], list[str]] = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if f.name == "__init__.py" else parts)
        package = module if f.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    targets = [".".join(base + [node.module])] if node.module else \
                        [".".join(base + [a.name]) for a in node.names]
                else:
                    targets = [node.module or ""]
            else:
                continue
            for t in targets:
                if t == "megatron_srft" or t.startswith("megatron_srft."):
                    src, dst = unit_of(module), unit_of(t)
                    if src != dst:
                        edges.setdefault((src, dst), []).append(str(f.relative_to(ROOT)))
    return edges


def units() -> set[str]:
    found = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return found | {p.stem for p in PACKAGE.glob("*.py")}


def test_every_unit_is_in_one_documented_layer():
    layers = documented_layers()
    listed = [u for layer in layers for u in layer]
    assert len(listed) == len(set(listed)), "a unit is listed in two layers"
    assert set(listed) == units(), (f"in the package, not in docs/architecture.md: {units() - set(listed)}; "
                                    f"documented but absent: {set(listed) - units()}")


def test_imports_point_down_the_layers():
    level = {u: i for i, layer in enumerate(reversed(documented_layers())) for u in layer}
    wrong = [f"{src} -> {dst} ({', '.join(sorted(set(files)))})" for (src, dst), files in imports().items()
             if level[dst] >= level[src]]
    assert not wrong, "imports against the layers of docs/architecture.md:\n" + "\n".join(sorted(wrong))


def test_the_core_never_imports_the_tools():
    tools = {"cli", "check", "experiments", "__main__"}
    wrong = [f"{src} -> {dst}" for (src, dst) in imports() if dst in tools and src not in tools]
    assert not wrong, wrong
