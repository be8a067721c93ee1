"""A fixture for tests that run programs in-process.

A program sets up logging on the root logger (jaxcls.cli.common.setup_logging), bound to
the stderr pytest captures for that one test; `restore_root_logging` gives each test the
root logger back as it was, so no later test logs to a closed stream. Import it into a
test module or conftest.py to use it there (it is autouse).
"""

import logging

import pytest


@pytest.fixture(autouse=True)
def restore_root_logging():
  handlers, level = list(logging.root.handlers), logging.root.level
  yield
  logging.root.handlers[:] = handlers
  logging.root.setLevel(level)
