"""Testing handlers, with or without the services.

- ``TaskHarness`` (``memory``): a task through the daemon's own decode -> registry -> handler
  -> outcome path with in-memory locks, results, costs and events (the same duplicate
  suppression, stored-result short circuit and budget refusal as the real effects layer). No
  broker, Redis or Postgres: a handler author's test in a few lines and milliseconds.
- ``running_daemon`` and ``wait_for`` (``live``): the real daemon in-process against a real
  broker, for what only the services can show (redelivery, persistence, the effects layer).
"""

from mlpipe.testing.live import running_daemon, wait_for
from mlpipe.testing.memory import MemoryEffects, Run, Stored, TaskHarness

__all__ = ["MemoryEffects", "Run", "Stored", "TaskHarness", "running_daemon", "wait_for"]
