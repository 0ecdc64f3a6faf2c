"""The repository's structure, checked from the source: layers import one way, no import cycles, Ray and DeepSpeed
only behind ``medmae/distributed`` (and the sweep's Ray Tune code), no file past the size a reader can hold.

Layers, top to bottom (an import may only go down or sideways within a layer):
launch / tools / bench → sweep, inference → training → tasks → models, data, distributed → config → layers, io.
Every import counts, also one inside a function or under ``TYPE_CHECKING``: a lazy import is still an upward one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    {"sweep", "inference"},
    {"training"},
    {"tasks"},
    {"models", "data", "distributed"},
    {"config"},
    {"layers", "io", "_compat", "__init__"},
]
HEAVY = {"ray": ("distributed", "sweep"), "deepspeed": ("distributed",)}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "medmae").rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``path`` imports (top level, in functions, under TYPE_CHECKING), resolved to medmae modules
    where they are ours (``from medmae.x import y`` is module ``medmae.x.y`` when that file exists)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(known)
            out |= subs
            if len(subs) < len(node.names):  # names from the module itself, not only its submodules
                out.add(node.module)
    return out


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {i for i in imports(p, known) if i in known and i != m} for m, p in known.items()}


def test_every_package_has_a_layer():
    tops = {m.split(".")[1] for m in modules() if "." in m}
    assert tops <= set().union(*LAYERS), f"add {sorted(tops - set().union(*LAYERS))} to LAYERS"


def test_layers_import_one_way():
    upward = [
        f"{m} -> {i}"
        for m, deps in graph().items()
        for i in deps
        if layer_of(i) < layer_of(m) and not (m == "medmae" or i == "medmae")
    ]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strongconnect(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", sorted(HEAVY))
def test_ray_and_deepspeed_stay_behind_the_distributed_layer(package):
    allowed = tuple(f"medmae.{p}" for p in HEAVY[package])
    offenders = [
        m
        for m, p in modules().items()
        if not m.startswith(allowed) and any(i == package or i.startswith(package + ".") for i in imports(p, {}))
    ]
    assert not offenders, f"{package} imported outside {allowed}: {offenders}"


def test_the_checker_sees_an_upward_and_a_cyclic_import(tmp_path, monkeypatch):
    """The checks above fail on a planted upward import and a planted cycle (so they cannot pass vacuously)."""
    fake = tmp_path / "medmae"
    for rel, text in {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/a.py": "from medmae.training import trainer\nfrom medmae.models import b\n",
        "models/b.py": "def f():\n    from medmae.models import a\n",
        "training/__init__.py": "",
        "training/trainer.py": "",
    }.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="medmae.models.a -> medmae.training.trainer"):
        test_layers_import_one_way()
    with pytest.raises(AssertionError, match="medmae.models.a <-> medmae.models.b"):
        test_no_import_cycles()


def test_no_python_file_over_500_lines():
    long = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for d in ("medmae", "launch", "tools", "bench", "tests")
        for p in sorted((ROOT / d).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 500
    ]
    assert not long, long


def test_importing_the_trainer_loads_no_heavy_library():
    """Every Ray worker and sweep trial imports the trainer; MONAI, timm/torchvision, DeepSpeed and Ray come in only
    where they are used (building a model, starting the engine), so the import costs about torch's own."""
    import subprocess
    import sys

    heavy = ("timm", "torchvision", "monai", "deepspeed", "ray", "nibabel", "itk", "webdataset", "zarr")
    code = "import sys, medmae.training.trainer, medmae.sweep.grid, medmae.data; print(sorted(sys.modules))"
    loaded = set(subprocess.check_output([sys.executable, "-c", code], cwd=ROOT, text=True).strip()[2:-2].split("', '"))
    assert not [m for m in heavy if m in loaded], [m for m in heavy if m in loaded]
    # and timm still imports after medmae on a machine whose torchvision C extension cannot load (this one)
    subprocess.check_call([sys.executable, "-c", "import medmae, timm.layers, torchvision"], cwd=ROOT)
