"""The import picture of the package has no arrow running back up (issue 13): each package imports only
packages below it, lazily or not, and no module names a higher one in a string ("pkg.mod:Class")."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# bottom to top; a module may import its own layer's other packages only where listed together
LAYERS = [
    {"marval_rl.recipe_schema", "marval_rl.weights_table", "marval_rl.strict_json"},
    {"marval_rl.config", "marval_rl.plugins", "marval_rl.hub", "marval_rl.run_outputs"},
    {"marval_rl.acceleration", "marval_rl.distributed"},
    {"marval_rl.models"},
    {"marval_rl.data", "marval_rl.sampling"},
    {"marval_rl.eval", "marval_rl.training", "marval_rl.loading", "marval_rl.lora"},
    {"marval_rl.rewards"},
    {"marval_rl.distill", "marval_rl.pretrain"},
    {"marval_rl.rl", "marval_rl.run_record"},
    {"marval_rl.preflight", "marval_rl.errors", "marval_rl.cli", "marval_rl.recipe_files", "marval_rl"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _modules():
    for p in sorted((ROOT / "marval_rl").rglob("*.py")):
        yield ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), p
    for p in sorted((ROOT / "rewards").rglob("*.py")):
        rel = ".".join(p.relative_to(ROOT / "rewards").with_suffix("").parts).removesuffix("__init__")
        yield ("marval_rl.rewards." + rel).rstrip("."), p


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports(module: str, path: Path):
    """Every marval_rl module ``module`` imports (any nesting) or names as "pkg.mod:Attr"."""
    tree = ast.parse(path.read_text())
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else [])), node.lineno
            elif node.module == "marval_rl":   # `from marval_rl import distributed`: the module named
                for a in node.names:
                    yield f"marval_rl.{a.name}", node.lineno
            elif node.module:
                yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"(marval_rl(?:\.\w+)+):\w+", node.value)
            if m:
                yield m.group(1), node.lineno


def test_every_package_is_placed_in_a_layer():
    # a new package added without deciding where it sits would escape the check below
    pkgs = {_package(m) for m, _ in _modules()}
    assert pkgs <= set(RANK), sorted(pkgs - set(RANK))


def test_no_import_runs_back_up():
    # e.g. models/ naming "rewards.embedded_clip:EmbeddedCLIP", or MAR importing the sampler lazily
    upward = []
    for module, path in _modules():
        src = _package(module)
        for target, line in _imports(module, path):
            if not target.startswith("marval_rl"):
                continue
            dst = _package(target)
            if dst != src and dst in RANK and RANK[dst] > RANK[src]:
                upward.append(f"{path.relative_to(ROOT)}:{line} {src} -> {dst}")
    assert not upward, "imports running back up:\n" + "\n".join(upward)


def test_models_name_nothing_above_them():
    # the strictest rule, stated on its own: models/ imports nothing of the package outside models/
    for module, path in _modules():
        if _package(module) == "marval_rl.models":
            out = {t for t, _ in _imports(module, path) if t.startswith("marval_rl") and
                   not t.startswith("marval_rl.models") and t != "marval_rl.strict_json"}  # (stdlib-only leaf)
            assert not out, (path, out)
