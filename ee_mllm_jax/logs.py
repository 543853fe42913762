"""Quiet library logs for the command-line entry points: INFO from this project (and the entry
script itself), only warnings and errors from libraries (Orbax logs ~40 INFO lines a save or
restore, Grain and JAX more)."""

from __future__ import annotations

import importlib.util
import logging
import os

from absl import logging as absl_logging


class OwnInfoOnly(logging.Filter):
  """Passes WARNING and above, and any record from this package or from `script`."""

  package_dir = os.path.dirname(importlib.util.find_spec("ee_mllm_jax").origin) + os.sep

  def __init__(self, script: str | None = None):
    super().__init__()
    self.script = script

  def filter(self, record):
    return (record.levelno >= logging.WARNING or record.pathname.startswith(self.package_dir)
            or record.pathname == self.script)


def quiet_libraries(script: str | None = None):
  """Installs `OwnInfoOnly` on absl's handler (what absl.app.run logs through: it sits on the root
  logger, so the package's stdlib loggers, `logging.getLogger(__name__)`, reach it too)."""
  absl_logging.get_absl_handler().addFilter(OwnInfoOnly(script))
