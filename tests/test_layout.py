"""The shape of the code, checked: no import cycles, plain models, programs at the edge,
functions short enough to read whole."""

import ast
import os

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "jaxcls")
# Modules kept for one release so that 0.1's commands and imports keep working.
SHIMS = {"jaxcls.main", "jaxcls.predict", "jaxcls.export", "jaxcls.step_benchmark",
         "jaxcls.predict_benchmark"}


def _modules() -> dict[str, ast.Module]:
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        module = module.removesuffix(".__init__")
        with open(path) as f:
          found[module] = ast.parse(f.read(), path)
  return found


def _is_main_block(node) -> bool:
  return (isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)
          and "__main__" in ast.unparse(node.test))


def _walk_importable(tree):
  """Every node that runs on import or in a call: `if __name__ == "__main__":` blocks
  (a program's own, or a 0.1 command kept working) are left out."""
  stack = [tree]
  while stack:
    node = stack.pop()
    yield node
    stack.extend(child for child in ast.iter_child_nodes(node)
                 if not _is_main_block(child))


def _imports(module: str, tree: ast.Module, known) -> set[str]:
  """Every jaxcls module `module` imports, at the top or inside a function."""
  out = set()
  package = module if any(k.startswith(module + ".") for k in known) else (
      module.rpartition(".")[0])
  for node in _walk_importable(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      names = [f"{base}.{alias.name}" for alias in node.names] + [base]
    else:
      continue
    for name in names:
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name and name != module:
        out.add(name)
  return out


def test_no_module_imports_itself_back():
  """The import graph of jaxcls (function-level imports included) has no cycle, bar
  the packages' own __init__ files re-exporting their modules and the 0.1 shims."""
  modules = _modules()
  graph = {m: {d for d in _imports(m, t, modules) if not m.startswith(d + ".")}
           for m, t in modules.items() if m not in SHIMS}
  state, path = {}, []

  def visit(node):
    state[node] = "open"
    path.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == "open":
        cycle = path[path.index(dep):] + [dep]
        pytest.fail("import cycle: " + " → ".join(cycle))
      if dep not in state:
        visit(dep)
    path.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)


def test_models_are_plain_flax():
  for module, tree in _modules().items():
    if module.startswith("jaxcls.models"):
      deps = _imports(module, tree, _modules())
      assert not any(d.startswith("jaxcls.cpu") for d in deps), (module, deps)
      text = ast.unparse(tree)
      assert "onednn" not in text.lower() and "conv_general_dilated" not in text, module


def test_programs_live_at_the_edge():
  """Only jaxcls/cli/ and jaxcls/benchmark/ parse command lines."""
  for module, tree in _modules().items():
    if module.startswith(("jaxcls.cli", "jaxcls.benchmark")) or module in SHIMS:
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        assert not any(n in ("argparse", "absl.app", "absl.flags", "flags") or
                       n.startswith("ml_collections.config_flags") for n in names), module


def test_no_function_is_longer_than_80_lines():
  long = []
  for module, tree in _modules().items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 80:
          long.append(f"{module}.{node.name}: {length} lines")
  assert long == []


def test_the_readmes_own_model_snippet_is_the_examples_code():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  snippet = readme.split("**Your own model**", 1)[1].split("```python\n", 1)[1]
  snippet = snippet.split("```", 1)[0]
  with open(os.path.join(ROOT, "examples", "my_model.py")) as f:
    assert snippet in f.read()
