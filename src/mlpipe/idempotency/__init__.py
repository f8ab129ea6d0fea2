"""Guards against running the same task twice at the same time (see ``lock``)."""

from mlpipe.idempotency.lock import Lease, LockManager, TaskLock

__all__ = ["Lease", "LockManager", "TaskLock"]
