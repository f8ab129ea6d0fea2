"""Guards against running the same task twice at the same time (see ``lock``)."""

from mlpipe.idempotency.lock import Lease, LockLost, LockManager, TaskLock

__all__ = ["Lease", "LockLost", "LockManager", "TaskLock"]
