"""The monitoring component (deploy/components/prometheus/): its rules pass `promtool check rules`
and their unit tests `promtool test rules`, every alert has a firing and a quiet unit test, a
severity, a summary, a description and a runbook entry that exists in docs/operations.md; the
dashboards are current with scripts/gen_dashboards.py and their queries parse; kustomize
renders the component with the dashboards as ConfigMaps for Grafana's sidecar.

tests/e2e/test_prometheus.py runs the same rules and queries against a real Prometheus."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import gen_dashboards
import pytest
import yaml

from tests.monitoring import (
    COMPONENT,
    RULES_TEST,
    alerting_rules,
    dashboard_queries,
    dashboards,
    rules,
    selectors,
    write_rules_for_promtool,
)

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
SEVERITIES = {"critical", "warning"}


# A bound on a hung promtool, not on its speed: the rules' unit tests took 18 s quiet, 49 s and
# over 60 s beside a benchmark (within the suite's 120 s per test).
PROMTOOL_TIMEOUT_S = 110


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    assert found is not None, "promtool is not on PATH: `make test` installs Debian's prometheus package"
    return subprocess.run(
        [found, *args], cwd=cwd, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S, check=False
    )


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    write_rules_for_promtool(tmp_path)
    checked = promtool("check", "rules", "sendtime-rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def test_promtool_unit_tests_of_every_alert_pass(tmp_path: Path) -> None:
    tests = write_rules_for_promtool(tmp_path)
    tested = promtool("test", "rules", tests.name, cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: with the breaker alert's threshold off, its firing case fails
    (its tests alone, to be quick)."""
    tests = write_rules_for_promtool(tmp_path)
    unit_tests = yaml.safe_load(tests.read_text())
    unit_tests["tests"] = [t for t in unit_tests["tests"] if "breaker" in t["name"]]
    assert len(unit_tests["tests"]) == 2
    tests.write_text(yaml.safe_dump(unit_tests))
    assert promtool("test", "rules", tests.name, cwd=tmp_path).returncode == 0
    rules_file = tmp_path / "sendtime-rules.yaml"
    text = rules_file.read_text()
    assert "sendtime_render_profile_breaker_open == 1" in text
    rules_file.write_text(text.replace("breaker_open == 1", "breaker_open == 2"))
    tested = promtool("test", "rules", tests.name, cwd=tmp_path)
    assert tested.returncode != 0
    assert "SendtimeRenderProfileBreakerOpen" in tested.stdout + tested.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases: dict[str, dict[str, int]] = defaultdict(lambda: {"firing": 0, "quiet": 0})
    severities_seen: dict[str, set[str]] = defaultdict(set)
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            expected = case.get("exp_alerts") or []
            cases[case["alertname"]]["firing" if expected else "quiet"] += 1
            severities_seen[case["alertname"]] |= {alert["exp_labels"]["severity"] for alert in expected}
    for rule in alerting_rules():
        name = rule["alert"]
        assert cases[name]["firing"] >= 1, f"{name} has no unit test where it fires"
        assert cases[name]["quiet"] >= 1, f"{name} has no unit test where it stays quiet"
        assert rule["labels"]["severity"] in severities_seen[name], (
            f"{name}: no test fires it as {rule['labels']}"
        )
    assert set(cases) <= {rule["alert"] for rule in alerting_rules()}, (
        "a unit test of an alert that does not exist"
    )


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``: lower case, punctuation dropped,
    spaces as hyphens."""
    anchors = set()
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)  # a # in code is no heading
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose, flags=re.MULTILINE):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook_entry() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    operations_table = OPERATIONS.read_text()
    for rule in alerting_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/operations.md", name
        assert anchor == name.lower(), f"{name}: its runbook anchor is {anchor!r}"
        assert anchor in anchors, f"docs/operations.md has no heading for {name} (#{anchor})"
        assert f"[{name}](#{anchor})" in operations_table, (
            f"the alerts table of docs/operations.md lacks {name}"
        )


def test_github_anchors_are_computed_as_github_does() -> None:
    markdown = "## Alerts and runbook\n```promql\n# a comment\n```\n"
    markdown += "#### SendtimeTargetDown\n### What's in (v1)\n"
    assert github_anchors(markdown) == {
        "alerts-and-runbook",
        "sendtimetargetdown",
        "whats-in-v1",
    }


def test_the_dashboards_are_what_gen_dashboards_writes() -> None:
    for path, text in gen_dashboards.rendered().items():
        assert path.exists(), f"{path.name} is missing: run `make gen`"
        assert path.read_text() == text, f"{path.name} is stale: run `make gen`"
    assert {path.name for path in gen_dashboards.rendered()} == set(dashboards())


def test_every_dashboard_panel_has_queries_that_parse() -> None:
    for name, board in dashboards().items():
        panels = [panel for panel in board["panels"] if panel["type"] != "row"]
        assert panels, name
        for panel in panels:
            assert panel["targets"], f"{name}: {panel['title']} has no query"
    queries = dashboard_queries()
    for name, title, expr in queries:
        assert selectors(expr), f"{name}: {title}: {expr}"
    # What the issue asks the dashboards to cover, a row each.
    rows = " ".join(
        p["title"].lower() for board in dashboards().values() for p in board["panels"] if p["type"] == "row"
    )
    for topic in ("freshness", "throughput", "latency", "errors", "cache", "fallbacks", "lag", "triggers"):
        assert topic in rows, f"no dashboard row about {topic}"


def test_a_dashboard_query_with_an_unknown_variable_is_refused() -> None:
    from tests.monitoring import grafana_substituted

    assert grafana_substituted("rate(x[$__rate_interval])") == "rate(x[1m])"
    with pytest.raises(ValueError, match=r"\$cluster"):
        grafana_substituted('x{cluster="$cluster"}')


def kustomized(tmp_path: Path) -> list[dict[str, Any]]:
    """The component rendered by kubectl's kustomize from a throwaway kustomization beside a
    copy of it (kustomize takes relative paths)."""
    shutil.copytree(COMPONENT, tmp_path / "prometheus")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "sendtime",
                "components": ["../prometheus"],
            }
        )
    )
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl is not on PATH"
    built = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, built.stderr
    return [document for document in yaml.safe_load_all(built.stdout) if document]


def test_kustomize_renders_the_monitor_the_rules_and_a_config_map_per_dashboard(tmp_path: Path) -> None:
    documents = kustomized(tmp_path)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for document in documents:
        by_kind[document["kind"]].append(document)
    (monitor,) = by_kind["ServiceMonitor"]
    assert monitor["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/part-of": "sendtime"}}
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]
    (rule,) = by_kind["PrometheusRule"]
    assert (
        rule["spec"]["groups"]
        == yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())["spec"]["groups"]
    )
    config_maps = by_kind["ConfigMap"]
    files = {key: value for config_map in config_maps for key, value in config_map["data"].items()}
    assert set(files) == set(dashboards())
    for config_map in config_maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == "sendtime"
    for name, text in files.items():
        assert yaml.safe_load(text) == dashboards()[name]  # JSON is YAML: the file, unchanged
