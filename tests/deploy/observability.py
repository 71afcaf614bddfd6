"""What the Grafana dashboard and the Prometheus alert rules in deploy/ query, and what a scrape exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lookout.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\blookout_[a-z0-9_]+\b")
TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard's panels (its variables as a match-all)."""
    return [
        target["expr"].replace("$stream", ".*")
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def alert_queries() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def metrics_in(queries: list[str]) -> set[str]:
    """The Lookout metric names ``queries`` read."""
    return {name for query in queries for name in METRIC.findall(query)}


def exported(scrape: str) -> set[str]:
    """The sample names a Prometheus text scrape can have: each family with its type's suffixes."""
    names = set()
    for family, kind in TYPE_LINE.findall(scrape):
        names.add(family)
        names.update(family + suffix for suffix in SUFFIXES.get(kind, ()))
    return names
