"""JSON Schema files for contract v1, generated from the pydantic models.

Other languages validate against ``contracts/*.schema.json``; ``tests/unit/test_contract.py``
fails when the committed files differ from what the models produce, so the two cannot drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from mlpipe.contract.events import ResultEvent
from mlpipe.contract.models import TASK_MODELS, Task

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema document: one per task type plus the envelope union."""
    out: dict[str, dict[str, Any]] = {}
    for task_type, model in TASK_MODELS.items():
        doc = model.model_json_schema(by_alias=True, mode="validation")
        out[f"{task_type.value}.schema.json"] = _stamp(doc, f"mlpipe task {task_type.value} v1")
    union = TypeAdapter(Task).json_schema(by_alias=True, mode="validation")
    out["task.schema.json"] = _stamp(union, "mlpipe task v1 (any task type)")
    event = ResultEvent.model_json_schema(by_alias=True, mode="validation")
    out["result_event.schema.json"] = _stamp(event, "mlpipe result event v1")
    return out


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in schemas().items():
        path = directory / name
        path.write_text(render(doc))
        written.append(path)
    return written


def _stamp(doc: dict[str, Any], title: str) -> dict[str, Any]:
    return {"$schema": SCHEMA_DIALECT, "title": title, **{k: v for k, v in doc.items()
                                                           if k != "title"}}
