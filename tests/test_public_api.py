"""The package's public names are exactly __all__, and each has a docstring."""

from __future__ import annotations

import inspect
import types

import iron_runtime_state


def test_public_names_are_exactly_all() -> None:
    public = {
        name
        for name, value in vars(iron_runtime_state).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"
    }
    assert public == set(iron_runtime_state.__all__) - {"__version__"}
    assert len(iron_runtime_state.__all__) == len(set(iron_runtime_state.__all__))


def test_every_public_name_is_documented() -> None:
    for name in iron_runtime_state.__all__:
        value = getattr(iron_runtime_state, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name} has no docstring"
            for attr, member in vars(value).items():
                if attr.startswith("_") or not callable(member):
                    continue
                assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


def test_core_imports_no_optional_dependency() -> None:
    import subprocess
    import sys

    code = (
        "import sys, iron_runtime_state;"
        "from iron_runtime_state import StateManager; StateManager.from_url('memory://');"
        "bad = [m for m in ('redis', 'typer', 'rich', 'prometheus_client', 'click') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
