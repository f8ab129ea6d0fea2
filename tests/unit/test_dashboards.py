"""The dashboard and alert files parse, and every mlpipe metric they query is exported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from mlpipe.observability.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: Series from RabbitMQ's own Prometheus plugin, not from mlpipe.
EXTERNAL = re.compile(r"^rabbitmq_")
FUNCTIONS = {"sum", "rate", "max", "min", "by", "histogram_quantile", "clamp_min", "absent",
             "or", "and", "le", "count"}


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"by \([^)]*\)", "", expr)
    names = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", expr))
    return {n for n in names if "_" in n and n not in FUNCTIONS}


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "mlpipe-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_every_queried_metric_is_exported() -> None:
    exported = Metrics().names()
    queried = set().union(*(metric_names(e) for e in dashboard_exprs() + alert_exprs()))
    ours = {n for n in queried if not EXTERNAL.match(n)}
    assert ours, "no mlpipe metric found in the dashboards: the parser is broken"
    assert ours <= exported, f"queried but not exported: {sorted(ours - exported)}"


def test_required_alerts_exist() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"MlpipeQueueBacklog", "MlpipeUnackedHigh", "MlpipeFailureRate",
            "MlpipeBudgetNearlySpent", "MlpipeNoWorkerConsuming",
            "MlpipeVideoWorkflowStuck"} <= names


def test_metric_name_parser() -> None:
    assert metric_names('sum by (queue) (rate(mlpipe_tasks_total{outcome="x"}[5m]))') == {
        "mlpipe_tasks_total"}
