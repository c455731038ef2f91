"""The built wheel holds every pass module under onnxshrink/passes and no top-level 'passes' package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(out), "-q"],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    (whl,) = out.glob("onnxshrink-*.whl")
    return whl


def test_wheel_contains_every_pass_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = sorted(p.name for p in (ROOT / "passes").glob("*.py"))
    assert "__init__.py" in modules
    missing = [m for m in modules if f"onnxshrink/passes/{m}" not in names]
    assert not missing, f"pass modules missing from the wheel: {missing}"
    core = sorted(p.name for p in (ROOT / "onnxshrink").glob("*.py"))
    assert not [m for m in core if f"onnxshrink/{m}" not in names]
    assert "onnxshrink/bundled/demo.onnx" in names


def test_wheel_has_no_top_level_passes_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("passes/")]
    top = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["onnxshrink"]


def test_passes_package_refuses_another_name():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('passes', r'{ROOT / 'passes' / '__init__.py'}')\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "try:\n    spec.loader.exec_module(mod)\nexcept ImportError as e:\n    print('refused', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert "refused" in res.stdout and "onnxshrink.passes" in res.stdout


def test_registry_covers_every_pass_module():
    from onnxshrink.passes import REGISTRY

    modules = {cls.__module__.rsplit(".", 1)[-1] for cls in REGISTRY.values()}
    files = {p.stem for p in (ROOT / "passes").glob("*.py")} - {"__init__"}
    helpers = {f for f in files if f.endswith("_rules") or f.startswith("_")}
    assert files - helpers <= modules, f"pass modules with no registered pass: {files - helpers - modules}"
    for name, cls in REGISTRY.items():
        assert cls.name == name


def test_all_lists_the_lazy_public_names():
    import onnxshrink

    assert sorted(onnxshrink.__all__) == sorted(["__version__", *onnxshrink._LAZY])
    for name in onnxshrink.__all__:
        assert getattr(onnxshrink, name) is not None
