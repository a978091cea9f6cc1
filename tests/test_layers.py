"""The package's layers point one way, and private APIs of other libraries are reached only in compat.py.

Read from the source with `ast` (no imports), so the check holds for lazy imports inside functions too.
"""
import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "tokenprune"

# Bottom to top: a package may import its own modules and packages of a lower layer, nothing else.
LAYERS = [
    {"compat", "envpaths"},                      # wrappers of private library APIs, paths
    {"tokens", "ssm"},                           # the token state and pure sequence ops; the selective scan
    {"models"},                                  # backbones with the token interface, timm registry
    {"pruning"},                                 # evaluators, reducers, stages, presets
    {"flops", "bench", "data", "report"},        # measurement, data, report writers
    {"evaluate", "lit", "vlm", "flops_table"},   # eval.py, train.py, the VLM integration, the FLOPs CLI
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}

# Attributes with a leading underscore that are public by convention: os._exit, namedtuple._replace,
# nn.Module._apply (overridden by PrunedModel to drop captured graphs), and our own parameter flag.
PUBLIC_UNDERSCORE = {"_exit", "_replace", "_apply", "_no_weight_decay"}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        yield rel, ast.parse(path.read_text(), filename=str(path))


def _package(rel: pathlib.PurePath) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _module_name(rel: pathlib.PurePath) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported(rel: pathlib.PurePath, node: ast.AST):
    """tokenprune-relative module paths (lists of parts) an import statement names."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = list(rel.parts[:-1])[: len(rel.parts) - node.level]
            target = base + (node.module.split(".") if node.module else [])
            names = [target + [a.name] for a in node.names] if not node.module else [target]
            return names
        if node.module and node.module.split(".")[0] == "tokenprune":
            return [node.module.split(".")[1:]]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "tokenprune"]
    return []


def test_every_package_has_a_layer():
    packages = {_package(rel) for rel, _ in _modules()} - {"__init__"}
    assert packages == set(RANK), f"packages without a layer: {packages - set(RANK)}; stale: {set(RANK) - packages}"


def test_imports_point_down_the_layers():
    bad = []
    for rel, tree in _modules():
        pkg = _package(rel)
        if pkg == "__init__":  # the package root re-exports the public API
            continue
        for node in ast.walk(tree):
            for target in _imported(rel, node):
                if not target:
                    continue
                tpkg = target[0]
                if tpkg != pkg and tpkg in RANK and RANK[tpkg] >= RANK[pkg]:
                    bad.append(f"{rel}:{node.lineno} ({pkg}, layer {RANK[pkg]}) imports {tpkg} (layer {RANK[tpkg]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    known = {_module_name(rel) for rel, _ in _modules()}
    graph = {}
    for rel, tree in _modules():
        name = _module_name(rel)
        deps = set()
        for node in ast.walk(tree):
            for target in _imported(rel, node):
                for k in range(len(target), 0, -1):  # the longest prefix that is a module of ours
                    cand = ".".join(target[:k])
                    if cand in known and cand != name:
                        deps.add(cand)
                        break
        # a package's __init__ imports its submodules; a submodule importing its own package's names is the
        # usual re-export, not a cycle of behaviour, so edges into an ancestor package are left out
        graph[name] = {d for d in deps if not name.startswith(d + ".") and d != ""}
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _private_uses(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != "__future__":
            if any(part.startswith("_") for part in node.module.split(".")):
                yield node.lineno, f"import from {node.module}"
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, (ast.Attribute, ast.Call, ast.Subscript)):
                root = root.func if isinstance(root, ast.Call) else root.value
            owner = root.id if isinstance(root, ast.Name) else None
            if owner in ("self", "cls", "ctx") or node.attr in PUBLIC_UNDERSCORE:
                continue  # our own private attributes
            yield node.lineno, f"{owner or '<expr>'}.{node.attr}"


def test_private_library_apis_only_in_compat():
    bad = [f"{rel}:{line}: {what}" for rel, tree in _modules() if rel.name != "compat.py"
           for line, what in _private_uses(tree)]
    assert not bad, "private APIs outside tokenprune/compat.py:\n" + "\n".join(bad)


@pytest.mark.parametrize("snippet, found", [
    ("from torch.utils._pytree import tree_leaves", True),
    ("x = torch._C._get_tracing_state()", True),
    ("env = trainer._accelerator_connector", True),
    ("y = self._cache", False),
    ("t = s._replace(a=1)", False),
])
def test_the_private_api_check_sees_what_it_should(snippet, found):
    assert bool(list(_private_uses(ast.parse(snippet)))) == found


def test_the_layer_check_sees_an_upward_import():
    rel = pathlib.PurePath("models/vim.py")
    targets = [t for node in ast.walk(ast.parse("from ..pruning import ops\nfrom ..tokens import TokenState"))
               for t in _imported(rel, node)]
    assert [t[0] for t in targets] == ["pruning", "tokens"]
    assert RANK["pruning"] > RANK["models"] > RANK["tokens"]
