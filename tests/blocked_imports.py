"""Running an example program in a Python whose import machinery refuses some packages,
to prove that the program needs none of them."""

import json
import os
import subprocess
import sys

# Runs argv[2:] as `python PROGRAM ARGS` would (its folder first on sys.path) with the
# top-level packages named in argv[1] made unimportable, then lists any that got loaded.
BLOCKER = r"""
import importlib.abc, json, os, runpy, sys
BLOCKED = tuple(sys.argv[1].split(","))

class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is blocked")
    return None

sys.meta_path.insert(0, Blocker())
for name in BLOCKED:
  try:
    __import__(name)
  except ImportError:
    continue
  raise SystemExit(f"the blocker let {name} through")
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
code = 0
try:
  runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
  code = e.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("BLOCKED MODULES LOADED:", json.dumps(loaded))
sys.exit(code)
"""

JAXCLS_AND_FRIENDS = ("jaxcls", "flax", "optax", "orbax", "grain", "tensorflow")


def run_blocked(program: str, args, blocked, cwd) -> tuple[int, list[dict], str]:
  """(exit status, the JSON lines it printed, stderr) of `python program args` with the
  `blocked` packages unimportable; fails the test if any of them was loaded anyway."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, "-c", BLOCKER, ",".join(blocked), program,
                         *args], env=env, capture_output=True, text=True, timeout=180,
                        cwd=cwd)
  *lines, last = done.stdout.strip().splitlines() or [""]
  assert last == "BLOCKED MODULES LOADED: []", (done.stdout, done.stderr)
  return done.returncode, [json.loads(line) for line in lines], done.stderr
