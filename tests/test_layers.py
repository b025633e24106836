"""The layers of the package (docs/ARCHITECTURE.md): every import, module-level or inside a
function, goes from a higher layer to a lower one (or within a layer). The one exception:
results' statsmodels-style convenience methods call the inference layer. Imports under
``if TYPE_CHECKING:`` (type hints only, nothing runs) are not dependencies."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lmefast

PACKAGE = Path(lmefast.__file__).parent

# lowest first; a module may import modules of its own layer or below
LAYERS: list[set[str]] = [
    {"errors", "parallel", "progress", "datasets", "_testing", "scaling",
     "_bfgs", "_kernel", "_kernels", "_multi", "_crossprods", "_threads"},
    {"structure", "formula", "design", "checks", "params"},
    {"spec", "lmer"},
    {"crossprods", "objective", "userobjective"},
    {"engine"},
    {"onefactor", "multi"},
    {"optimize", "smparams"},
    {"results"},
    {"model", "regularized", "distribution"},
    {"summary", "inference", "profile", "bootstrap", "predict", "plots"},
    {"chunked"},
    {"chunked_multi", "outofcore", "dask"},
    {"api", "many"},
    {"cli"},
    {"__main__", "__init__"},
]
ALLOWED_UPWARD = {("results", m) for m in ("summary", "inference", "profile", "bootstrap", "predict", "plots")}
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _imports(path: Path) -> set[str]:
    """lmefast modules imported anywhere in the file, inside functions too (not in a
    TYPE_CHECKING block)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmefast"):
            parts = node.module.split(".")
            if len(parts) > 1:
                out.add(parts[1])
            else:  # from lmefast import x
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lmefast."):
                    out.add(a.name.split(".")[1])
    return out


def test_every_module_has_a_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.stem for p in PACKAGE.glob("*.pyx")}
    assert sorted(modules - set(LAYER_OF)) == []


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_imports_go_down(module: str) -> None:
    here = LAYER_OF[module]
    upward = sorted(m for m in _imports(PACKAGE / f"{module}.py")
                    if m in LAYER_OF and LAYER_OF[m] > here and (module, m) not in ALLOWED_UPWARD)
    assert upward == [], f"lmefast.{module} (layer {here}) imports higher layers: {upward}"


def test_the_check_sees_function_level_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("if TYPE_CHECKING:\n    from lmefast.cli import main\n"
                 "def g():\n    from lmefast.api import lmer\n    import lmefast.model\n")
    assert _imports(f) == {"api", "model"}
