"""mlpipe: ML pipeline work over RabbitMQ with exactly-once effects."""

from mlpipe.contract.models import TaskType, build_task
from mlpipe.errors import (
    BudgetExceeded,
    BufferFull,
    CircuitOpen,
    ContractError,
    MlpipeError,
    PermanentError,
    PublishError,
    TransientError,
)
from mlpipe.handlers import Cost, HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer, PublishReceipt
from mlpipe.settings import Settings

__all__ = [
    "BudgetExceeded",
    "BufferFull",
    "CircuitOpen",
    "ContractError",
    "Cost",
    "HandlerResult",
    "MlpipeError",
    "PermanentError",
    "Producer",
    "PublishError",
    "PublishReceipt",
    "Registry",
    "Settings",
    "TaskContext",
    "TaskType",
    "TransientError",
    "build_task",
]
