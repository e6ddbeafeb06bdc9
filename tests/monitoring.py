"""What the monitoring tests share: the rules of deploy/components/prometheus/ as promtool reads
them, the dashboards' queries as Prometheus receives them from Grafana, and the vector selectors
(metric and label matchers) of a PromQL expression, found by a real PromQL parser."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPONENT = ROOT / "deploy" / "components" / "prometheus"
PROMETHEUS_RULE = COMPONENT / "prometheusrule.yaml"
RULES_TEST = COMPONENT / "tests" / "sendtime-rules.test.yaml"
DASHBOARDS = COMPONENT / "dashboards"
# The file name the unit tests' rule_files names.
RULES_FILE_NAME = "sendtime-rules.yaml"

# What Grafana puts in place of its variables before a query reaches Prometheus: steps that fit
# a scrape every second, as the monitoring test has.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m"}


def rule_groups() -> list[dict[str, Any]]:
    """The PrometheusRule's spec.groups."""
    document = yaml.safe_load(PROMETHEUS_RULE.read_text())
    groups: list[dict[str, Any]] = document["spec"]["groups"]
    return groups


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def alerting_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def write_rules_for_promtool(directory: Path) -> Path:
    """The rules as a Prometheus rules file, with the unit tests beside it; the tests' path."""
    (directory / RULES_FILE_NAME).write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    return Path(shutil.copy(RULES_TEST, directory / RULES_TEST.name))


def dashboards() -> dict[str, dict[str, Any]]:
    """Each dashboard's JSON by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, query with Grafana's variables substituted) for every
    target of every panel."""
    found = []
    for name, board in dashboards().items():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((name, panel["title"], grafana_substituted(target["expr"])))
    return found


def grafana_substituted(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    leftover = re.search(r"\$\w+|\$\{\w+\}", expr)
    if leftover:
        raise ValueError(f"unknown Grafana variable {leftover.group()} in {expr!r}")
    return expr


@dataclass(frozen=True, slots=True)
class Matcher:
    label: str
    op: str  # =, !=, =~, !~
    value: str

    def promql(self) -> str:
        return f"{self.label}{self.op}{json.dumps(self.value)}"


@dataclass(frozen=True, slots=True)
class Selector:
    metric: str
    matchers: tuple[Matcher, ...]

    def promql(self, matchers: tuple[Matcher, ...] | None = None) -> str:
        chosen = self.matchers if matchers is None else matchers
        return self.metric + "{" + ",".join(m.promql() for m in chosen) + "}"


# The parser's MatchOp is not hashable: keyed by its name.
_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of ``expr`` (those inside range selectors too), each with its
    metric name and label matchers.

    Raises:
        ValueError: ``expr`` is not PromQL, or a selector has no metric name.
    """
    found: list[Selector] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = tuple(
                Matcher(m.name, _OPS[str(m.op)], m.value)
                for m in node.matchers.matchers
                if m.name != "__name__"
            )
            if not node.name:
                raise ValueError(f"a selector without a metric name in {expr!r}")
            found.append(Selector(node.name, matchers))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found
