"""Architecture checks: where heavy stacks may be imported (STYLE §8.3), and a light import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import asyncrl

PACKAGE = Path(asyncrl.__file__).parent

# stack → the package prefixes allowed to import it
ALLOWED = {
    "ray": ("asyncrl/cluster/", "asyncrl/controller/"),
    "grpc": ("asyncrl/reward/remote/",),
    "vllm": ("asyncrl/rollout/engine/vllm.py",),
    "megatron": ("asyncrl/train/megatron/",),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_heavy_stacks_are_imported_only_where_allowed():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        for stack in _imports(path) & ALLOWED.keys():
            if not rel.startswith(ALLOWED[stack]):
                offenders.append(f"{rel} imports {stack}")
    assert not offenders, offenders


def test_algo_takes_plain_arguments_not_config():
    for path in (PACKAGE / "algo").rglob("*.py"):
        source = path.read_text()
        assert "asyncrl.config" not in source and "asyncrl.controller" not in source, path


def test_importing_asyncrl_pulls_in_neither_torch_nor_ray():
    code = "import sys, asyncrl; print([m for m in ('torch', 'ray') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
