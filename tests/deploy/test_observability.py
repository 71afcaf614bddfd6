"""The Grafana dashboard and the Prometheus alert rules in deploy/ are valid and query only what Lookout
exports: ``promtool`` (Debian's ``prometheus``) checks and unit-tests the rules and parses every
dashboard query; the metric names are checked against the services' registry here and against a
live scrape of the running stack in tests/e2e/test_stack_restart.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import REGISTRY, generate_latest

import core.metrics  # noqa: F401  (registers every Lookout metric)
from tests.deploy.observability import (
    ALERTS,
    DEPLOY,
    alert_queries,
    dashboard,
    dashboard_queries,
    exported,
    metrics_in,
)

PROMTOOL = shutil.which("promtool")  # deploy/apt-packages.txt: bootstrap installs it


def promtool(*args: str, cwd: Path | None = None) -> str:
    assert PROMTOOL is not None, "promtool missing: apt-get install prometheus (deploy/apt-packages.txt)"
    result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_checks_the_alert_rules_and_their_unit_tests_pass() -> None:
    assert "SUCCESS: 10 rules found" in promtool("check", "rules", str(ALERTS))
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml", cwd=ALERTS.parent)


def test_promtool_checks_the_prometheus_config_with_its_rules(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]  # where compose mounts it
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    assert "SUCCESS" in promtool("check", "config", str(tmp_path / "prometheus.yml"))
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert jobs == {name for name in compose if name.startswith("lookout-")}, "a service not scraped"


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"q:{i}", "expr": q} for i, q in enumerate(queries)]}
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(queries)} rules found" in promtool(
        "check", "rules", str(tmp_path / "dashboard.yml")
    )


def test_the_dashboard_is_laid_out_and_provisioned() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    titles = " ".join(panel["title"].lower() for panel in board["panels"])
    for topic in ("streams", "frames per second", "dropped", "lag", "inference", "restarts", "storage"):
        assert topic in titles, topic
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert {t["datasource"]["uid"] for p in board["panels"] for t in p.get("targets", [])} == {uid}


def test_every_metric_the_dashboard_and_the_rules_query_is_one_lookout_exports() -> None:
    registered = exported(generate_latest(REGISTRY).decode())
    wanted = metrics_in(dashboard_queries()) | metrics_in(alert_queries())
    assert len(wanted) >= 20
    assert wanted - registered == set()
