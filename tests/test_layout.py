"""The shape of the code, checked: no import cycles, plain models, programs at the edge,
functions short enough to read whole."""

import ast
import functools
import os
import tomllib

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "jaxcls")
# The programs: argument parsing, `python -m`, jaxcls.cli's helpers. Every other module
# is the library, which they import and which never imports them.
PROGRAM_PACKAGES = ("jaxcls.cli", "jaxcls.benchmark")


@functools.cache  # Parsed once for all tests (read-only).
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
  """Every node that runs on import or in a call: a program's `if __name__ ==
  "__main__":` block is left out."""
  stack = [tree]
  while stack:
    node = stack.pop()
    yield node
    stack.extend(child for child in ast.iter_child_nodes(node)
                 if not _is_main_block(child))


def _imports(module: str, tree: ast.Module, known, *, main_blocks: bool = False) -> set[str]:
  """Every jaxcls module `module` imports, at the top or inside a function (and in its
  `__main__` block with `main_blocks`)."""
  out = set()
  package = module if any(k.startswith(module + ".") for k in known) else (
      module.rpartition(".")[0])
  for node in (ast.walk(tree) if main_blocks else _walk_importable(tree)):
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
  the packages' own __init__ files re-exporting their modules."""
  modules = _modules()
  graph = {m: {d for d in _imports(m, t, modules) if not m.startswith(d + ".")}
           for m, t in modules.items()}
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
    if module.startswith(PROGRAM_PACKAGES):
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        assert not any(n in ("argparse", "absl.app", "absl.flags", "flags") or
                       n.startswith("ml_collections.config_flags") for n in names), module


def test_the_library_never_imports_the_programs():
  """No module outside jaxcls/cli/ and jaxcls/benchmark/ imports either, anywhere in
  the file (`__main__` blocks and functions included). The benchmarks are programs
  (each parses its command line with jaxcls.cli.common), reached only through
  `jaxcls-benchmark`."""
  modules = _modules()
  found = {}
  for module, tree in modules.items():
    if module.startswith(PROGRAM_PACKAGES):
      continue
    programs = {d for d in _imports(module, tree, modules, main_blocks=True)
                if d.startswith(PROGRAM_PACKAGES)}
    if programs:
      found[module] = sorted(programs)
  assert found == {}


def _scripts() -> dict[str, str]:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["scripts"]


def test_each_program_has_one_module_form_python_dash_m_jaxcls_cli_name():
  """`jaxcls-NAME` is `jaxcls.cli.NAME:cli`, and that module, run by `python -m`, is the
  only module that runs as a program: no other `__main__` block or `__main__.py`."""
  scripts = _scripts()
  assert all(target == f"jaxcls.cli.{name.removeprefix('jaxcls-')}:cli"
             for name, target in scripts.items()), scripts
  runnable = {module for module, tree in _modules().items()
              if module.endswith(".__main__") or any(map(_is_main_block, tree.body))}
  assert runnable == {f"jaxcls.cli.{name.removeprefix('jaxcls-')}" for name in scripts}


def test_the_0_1_aliases_are_gone_in_0_3():
  modules = _modules()
  old = {"jaxcls.main", "jaxcls.predict", "jaxcls.export", "jaxcls.step_benchmark",
         "jaxcls.predict_benchmark", "jaxcls.serve.__main__", "jaxcls.benchmark.__main__",
         "jaxcls.pretrained.__main__"}
  assert old & set(modules) == set()
  summary, = [node for node in modules["jaxcls.train"].body
              if isinstance(node, ast.ClassDef) and node.name == "RunSummary"]
  methods = {node.name for node in summary.body if isinstance(node, ast.FunctionDef)}
  assert "__getitem__" not in methods  # summary["val_accuracy"], 0.1's dict access.


def test_the_version_is_declared_alike():
  import jaxcls
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    assert tomllib.load(f)["project"]["version"] == jaxcls.__version__ == "0.3.0"


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
