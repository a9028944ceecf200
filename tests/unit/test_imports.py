"""
The rule of the house, checked from the imports alone: subsystems never
import each other; the kernel imports no subsystem; the vocabulary imports
nothing but itself; only the composition root touches the global reactor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "piccolod"
VOCABULARY = {"piccolod.events", "piccolod.commands", "piccolod.errors", "piccolod.interfaces"}
SUBSYSTEMS = {
    "consensus",
    "persistence",
    "apps",
    "services",
    "mdns",
    "remote",
    "api",
    "devices",
    "cluster",
}
COMPOSITION_ROOT = {"piccolod.tap"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            for alias in node.names:
                found.append((f"{target}.{alias.name}", node.lineno))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _area(module: str) -> str:
    """``kernel``, ``vocabulary``, ``subsystem:<name>``, ``testing``, ``root`` or ``other``."""
    if any(module == v or module.startswith(v + ".") for v in VOCABULARY):
        return "vocabulary"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "kernel":
        return "kernel"
    if len(parts) > 1 and parts[1] in SUBSYSTEMS:
        return f"subsystem:{parts[1]}"
    if len(parts) > 1 and parts[1] == "testing":
        return "testing"
    if any(module == r or module.startswith(r + ".") for r in COMPOSITION_ROOT):
        return "root"
    return "other"


def violations() -> list[str]:
    found: list[str] = []
    for path in _modules():
        module = _module_name(path)
        area = _area(module)
        for target, line in _imports(path):
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            if target == "twisted.internet.reactor" and area != "root":
                found.append(f"{where}: only the composition root imports the global reactor")
            if not target.startswith("piccolod"):
                continue
            target_area = _area(target)
            if area == "vocabulary" and target_area not in ("vocabulary",) and target != "piccolod":
                found.append(f"{where}: the vocabulary imports {target}")
            elif area == "kernel" and target_area.startswith("subsystem:"):
                found.append(f"{where}: the kernel imports the subsystem {target}")
            elif (
                area.startswith("subsystem:")
                and target_area.startswith("subsystem:")
                and target_area != area
            ):
                found.append(f"{where}: {area} imports another subsystem, {target}")
            elif area.startswith("subsystem:") and target_area in ("root", "testing"):
                found.append(f"{where}: {area} imports {target}")
            elif area == "kernel" and target_area in ("root", "testing"):
                found.append(f"{where}: the kernel imports {target}")
    return found


def test_import_rules_hold() -> None:
    """No module of piccolod/ breaks the import rules of ARCHITECTURE.md."""
    assert violations() == []


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("from piccolod.mdns import x\n", "piccolod/apps/x.py", "apps imports another"),
        ("import piccolod.apps.fake\n", "piccolod/kernel/x.py", "the kernel imports the subsystem"),
        ("from twisted.internet import reactor\n", "piccolod/kernel/x.py", "global reactor"),
        ("from piccolod.kernel import bus\n", "piccolod/events.py", "the vocabulary imports"),
        ("from ..mdns import thing\n", "piccolod/apps/x.py", "apps imports another"),
    ],
)
def test_checker_catches_violations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, module: str, expected: str
) -> None:
    """The checker reports each kind of violation (so a passing check means something)."""
    fake_root = tmp_path / "piccolod"
    target = fake_root / module.removeprefix("piccolod/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake_root)
    found = violations()
    assert any(expected in v for v in found), found


def test_subsystem_may_import_kernel_and_vocabulary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Imports of the kernel, the interfaces and the vocabulary are allowed in a subsystem."""
    fake_root = tmp_path / "piccolod"
    (fake_root / "apps").mkdir(parents=True)
    (fake_root / "apps" / "x.py").write_text(
        "from piccolod.kernel.aio import call\nfrom piccolod.events import Event\n"
        "from piccolod.interfaces import IEventBus\nfrom . import y\n"
    )
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake_root)
    assert violations() == []
