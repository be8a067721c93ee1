"""What every jaxcls program shares: one flag style, recipes with overrides, one way of
failing.

- Flags are argparse long options with hyphens (`--workdir`, `--top-k`); older spellings
  with underscores stay as aliases.
- `--config FILE` loads a recipe (a Python file with `get_config()`); any
  `--config.KEY=VALUE` (or `--config.KEY VALUE`) then overrides one key, with VALUE read
  as the key's type. An unknown key or a value of the wrong type is an error naming the
  key and the closest valid ones.
- A problem the user can fix (`jaxcls.errors.JaxclsError`, bad flags) is one line on
  standard error, `error: ...`, and exit status 2; no traceback.

This module imports nothing heavy, so a program can call `configure_process()` (which
may re-execute it) before JAX loads.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
import traceback
from typing import Any, Callable, Sequence

from jaxcls.errors import JaxclsError

CACHE_ENV = "JAXCLS_COMPILATION_CACHE"  # A folder, or "off".
_OFF = ("", "0", "off", "false", "no", "none")


class UsageError(JaxclsError):
  """Bad command-line flags."""


class Parser(argparse.ArgumentParser):
  """argparse, failing the jaxcls way: `error: ...` (with a pointer to --help), exit 2."""

  def error(self, message: str):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def configure_process(*, tune_allocator: bool = False) -> None:
  """Process options before JAX starts: XLA:GPU options on a GPU host (jaxcls.gpu), the
  CPU's otherwise (jaxcls.cpu.process, which may re-execute)."""
  from jaxcls import gpu
  gpu.apply()
  from jaxcls.cpu.process import configure_process as configure
  configure(tune_allocator=tune_allocator)


def add_config_flag(parser: argparse.ArgumentParser, required: bool = True) -> None:
  parser.add_argument(
      "--config", required=required, metavar="FILE",
      help="Recipe file (configs/*.py). Override any key with --config.KEY=VALUE, e.g. "
           "--config.optim.learning_rate=0.01 (all keys: jaxcls/config.py).")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(other arguments, [(key, text)]) for `--config.KEY=VALUE` and `--config.KEY VALUE`."""
  rest, overrides = [], []
  items = list(argv)
  i = 0
  while i < len(items):
    item = items[i]
    if item.startswith("--config."):
      key, sep, text = item[len("--config."):].partition("=")
      if not sep:
        if i + 1 >= len(items):
          raise UsageError(f"--config.{key} needs a value: --config.{key}=VALUE.")
        i, text = i + 1, items[i + 1]
      overrides.append((key, text))
    else:
      rest.append(item)
    i += 1
  return rest, overrides


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
  """(argparse namespace, config overrides) from the command line."""
  rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(rest)
  if overrides and not hasattr(args, "config"):
    raise UsageError(f"{parser.prog} takes no --config.KEY overrides.")
  return args, overrides


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
          tuple: "a tuple such as (1, 2)", list: "a tuple such as (1, 2)"}


def _read_value(key: str, text: str, default: Any) -> Any:
  """`text` read as the type of `default` (a bool, number, string or tuple)."""
  expected = _KINDS.get(type(default), type(default).__name__)
  try:
    if isinstance(default, bool):
      words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
      return words[text.strip().lower()]
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    if isinstance(default, str):
      return text
    value = ast.literal_eval(text)
    if isinstance(default, (tuple, list)):
      return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return value
  except (KeyError, ValueError, SyntaxError):
    from jaxcls.config import ConfigError
    raise ConfigError(f"--config.{key}={text!r}: expected {expected}, like the "
                      f"default {default!r}.") from None


def apply_overrides(config, overrides: Sequence[tuple[str, str]]):
  """Sets each (key, text) on `config`; unknown keys name the closest known ones."""
  from jaxcls import config as config_lib
  known = config_lib.flatten(config)
  for key, text in overrides:
    if key not in known:
      raise config_lib.unknown_key_error(key, known, f" (--config.{key}={text})")
    *parents, leaf = key.split(".")
    target = config
    for part in parents:
      target = target[part]
    target[leaf] = _read_value(key, text, known[key])
  return config


def load_config(path: str, overrides: Sequence[tuple[str, str]] = ()):
  """`get_config()` of the recipe at `path`, with the overrides applied."""
  from jaxcls.config import ConfigError, import_recipe
  if not os.path.isfile(path):
    raise ConfigError(f"Config file '{path}' does not exist; pass a recipe such as "
                      "configs/demo.py.")
  module = import_recipe(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"Config file '{path}' defines no get_config(); a recipe returns "
                      "jaxcls.config.base_config() with its changes.")
  return apply_overrides(module.get_config(), overrides)


def run(main: Callable[[], int | None]) -> int:
  """Calls `main`; turns the errors a user can fix into `error: ...` and status 2."""
  drop_closed_loop_callbacks()
  try:
    return main() or 0
  except JaxclsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted.", file=sys.stderr)
    return 130


def drop_closed_loop_callbacks() -> None:
  """Keeps one known race from printing tracebacks after a program's `error:` line.

  When a checkpoint write fails (a full disk), Orbax closes the event loop that awaited
  its TensorStore writes while others are still running; each that finishes later calls
  the closed loop's `call_soon_threadsafe` from a TensorStore thread, and Python prints
  the RuntimeError as an unraisable exception, a bare traceback each (22 in one test
  run). The error was already reported and the checkpoints are intact, so programs drop
  exactly these; every other unraisable exception reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable) -> None:
    if not _is_closed_loop_callback(unraisable):
      previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


def _is_closed_loop_callback(unraisable) -> bool:
  error = unraisable.exc_value
  if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed":
    return False
  return any(frame.name == "call_soon_threadsafe"
             and frame.filename.endswith(os.path.join("asyncio", "base_events.py"))
             for frame in traceback.extract_tb(unraisable.exc_traceback))


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "jax", "orbax", "httpx2"):  # httpx2: huggingface_hub's requests.
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # huggingface_hub has a handler of its own and propagates too (each line twice), and
  # warns at every retry of a failed connection: jaxcls says what it fetches and, if that
  # fails, one error line.
  hub_logger = logging.getLogger("huggingface_hub")
  hub_logger.setLevel(logging.ERROR)
  hub_logger.propagate = False
  # Libraries that read absl flags (grain's multiprocessing) find them parsed.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def add_weights_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--weights", choices=("raw", "ema"), default="raw",
                      help="raw (default), or ema: the weight average of a run trained "
                           "with optim.ema_decay > 0.")


def add_cache_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--compilation-cache", default=None, metavar="DIR",
                      help="JAX persistent compilation cache folder (default: "
                           f"${CACHE_ENV}, else ~/.cache/jaxcls/jax_cache).")
  parser.add_argument("--no-compilation-cache", action="store_true",
                      help="Compile from scratch and keep nothing.")


def default_cache_dir() -> str:
  """Where programs keep compiled programs: $XDG_CACHE_HOME/jaxcls/jax_cache."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxcls", "jax_cache")


def resolve_cache_dir(flag: str | None = None, disabled: bool = False) -> str | None:
  """The cache folder to use: the flag, else $JAXCLS_COMPILATION_CACHE, else the default.

  None means no cache: --no-compilation-cache, or the variable set to "off" (or "0").
  """
  if disabled:
    return None
  if flag:
    return os.path.expanduser(flag)
  env = os.environ.get(CACHE_ENV)
  if env is not None:
    return None if env.strip().lower() in _OFF else os.path.expanduser(env)
  return default_cache_dir()


def enable_compilation_cache(flag: str | None = None, disabled: bool = False) -> str | None:
  """Points JAX's persistent compilation cache at the resolved folder; returns it.

  A folder set through JAX's own JAX_COMPILATION_CACHE_DIR is kept unless the flag names
  another. Small models compile in well under JAX's default one-second threshold for
  caching, so every program is cached. An unusable folder is a warning, not an error.
  """
  import jax
  path = resolve_cache_dir(flag, disabled)
  if path is None or (not flag and jax.config.jax_compilation_cache_dir):
    return None
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
      raise PermissionError(f"'{path}' is not writable")
  except OSError as e:
    print(f"warning: compilation cache disabled: cannot use '{path}' ({e}). Pass "
          f"--compilation-cache DIR or set {CACHE_ENV}=off.", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"'{text}' is not a positive whole number")
  return value
