"""The layers bin -> supervisor -> vcpu_worker -> devices -> proto: a module imports only its own layer or lower ones.

Every import counts: at module level, inside functions, and importlib calls
with a literal name.  Two more rules: devices/ starts no processes (whoever
runs a device decides where it runs), and vcpu_worker/ never reaches the
supervisor.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LAYERS = ("proto", "devices", "vcpu_worker", "supervisor", "bin")
RANK = {name: i for i, name in enumerate(LAYERS)}
PROCESS_MAKERS = {"subprocess", "multiprocessing", "os.fork", "os.forkpty", "os.posix_spawn", "os.posix_spawnp",
                  "os.system", "os.popen", "os.execv", "os.execve", "os.execvp", "os.spawnv", "pty.fork"}


def sources():
    for layer in LAYERS[:-1]:
        for path in sorted((REPO / layer).rglob("*.py")):
            yield layer, path
    yield "bin", REPO / "bin" / "hvctl"


def imported_modules(tree):
    """(line, module name) of every import in the tree, nested ones and importlib.import_module("literal") too."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
            for alias in node.names:          # from pyhv import proto: the submodule is the import
                yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and \
                isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def layer_of(module):
    """The layer a pyhv module belongs to, or None (the standard library, third parties, the pyhv namespace)."""
    parts = module.split(".")
    if parts[0] != "pyhv" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in RANK else None


def test_every_import_goes_down_the_layers():
    violations = []
    count = 0
    for layer, path in sources():
        tree = ast.parse(path.read_text(), str(path))
        for line, module in imported_modules(tree):
            count += 1
            target = layer_of(module)
            if target is not None and RANK[target] > RANK[layer]:
                violations.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {module}")
            if module.split(".")[0] in LAYERS[:-1]:
                violations.append(f"{path.relative_to(REPO)}:{line}: {module} without the pyhv. prefix")
    assert count > 300                        # the walk really read the tree
    assert violations == []


def test_devices_start_no_processes():
    found = []
    for layer, path in sources():
        if layer != "devices":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for line, module in imported_modules(tree):
            if module.split(".")[0] in ("subprocess", "multiprocessing", "pty"):
                found.append(f"{path.relative_to(REPO)}:{line}: imports {module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    f"{node.value.id}.{node.attr}" in PROCESS_MAKERS:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: calls {node.value.id}.{node.attr}")
    assert found == []


@pytest.mark.parametrize("source, bad", [
    ("from pyhv.supervisor import cli", True),
    ("def f():\n    import pyhv.vcpu_worker.kvm\n", True),
    ("import importlib\nimportlib.import_module('pyhv.supervisor.server')\n", True),
    ("from pyhv.proto import codec", False),
    ("import os, sys", False),
])
def test_the_checker_sees_nested_and_dynamic_imports(source, bad):
    imports = [m for _, m in imported_modules(ast.parse(source))]
    assert any(layer_of(m) in ("supervisor", "vcpu_worker") for m in imports) is bad


def test_no_two_test_files_share_a_name():
    """The tiers have no __init__.py, so pytest imports test files by base name: two of one name make the whole
    suite's collection fail, which a run of one tier does not show."""
    names = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        names.setdefault(path.name, []).append(str(path.relative_to(REPO)))
    assert {n: p for n, p in names.items() if len(p) > 1} == {}
