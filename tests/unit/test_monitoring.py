"""deploy/monitoring/: the alert rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``), every alert is tested firing and not firing and documented, and
every metric the rules and the Grafana dashboard query is one the aggregator really exports
(read from a live :class:`AggregatorMetrics` registry) or, for the per-device panel, one in
the agent's textfile catalogue."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.metrics import AggregatorMetrics
from edge_agent.textfile import AGENT_METRICS

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMETHEUS_EXAMPLE = MONITORING / "prometheus.example.yml"
DOCS = ROOT / "docs" / "monitoring.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed: `make test` installs the Debian package prometheus "
    "(Makefile APT_PACKAGES)",
)

#: Series the rules need from outside the aggregator (docs/monitoring.md, "Requirements").
EXTERNAL_SERIES = {
    "up",
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
    "node_filesystem_readonly",
}
DS_UID = "${DS_PROMETHEUS}"
#: Grafana's built-in variables and the dashboard's own, with values promtool accepts.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": "agg:9108",
}


# --------------------------------------------------------------------------- PromQL names
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_MODIFIER = re.compile(r"\boffset\s+-?[0-9a-z]+|@\s*(?:start\(\)|end\(\)|[0-9.]+)")
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (function and aggregation names, label
    names, label values, durations and numbers are not)."""
    s = _STRING.sub('""', expr)
    assert "__name__" not in s, f"select metrics by name, not by __name__: {expr}"
    s = _MATCHERS.sub(" ", s)
    s = _RANGE.sub(" ", s)
    s = _LABEL_LIST.sub(" ", s)
    s = _MODIFIER.sub(" ", s)
    s = _NUMBER.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        word = m.group()
        if s[m.end():].lstrip().startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function or aggregation call, or an operator keyword
        names.add(word)
    return names


def exported_series(metrics: AggregatorMetrics) -> set[str]:
    """Every series name the aggregator's registry exposes: counters as ``_total`` (and
    ``_created``), histograms as ``_bucket``/``_sum``/``_count`` (and ``_created``), gauges
    as they are; never a counter's bare family name."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    out: set[str] = set()
    for family in metrics.registry.collect():
        assert family.type in suffixes, f"{family.name}: type {family.type} not handled here"
        out |= {family.name + s for s in suffixes[family.type]}
        out |= {sample.name for sample in family.samples}
    return out


@pytest.fixture(scope="module")
def aggregator_series() -> set[str]:
    return exported_series(AggregatorMetrics())


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up == 0", {"up"}),
        ('rate(fedmq_bytes_in_total{instance="$instance"}[$__rate_interval])',
         {"fedmq_bytes_in_total"}),
        ("histogram_quantile(0.95, sum by (le) (rate(fedmq_fold_seconds_bucket[5m])))",
         {"fedmq_fold_seconds_bucket"}),
        ("increase(a_sum[1h]) / increase(a_count[1h] offset 5m) > 1e3",
         {"a_sum", "a_count"}),
        ("x / ignoring(reason) group_left() (y + sum without(reason) (z)) > bool 0.1",
         {"x", "y", "z"}),
        ('sum(rate(r_total{reason=~"bad_signature|rate"}[10m])) by (reason) and on() vector(1)',
         {"r_total"}),
        ("time() - max by (device) (last_seen)", {"last_seen"}),
        ("max_over_time(g[1h:5m]) unless g", {"g"}),
    ],
)
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_exported_series_come_from_the_live_registry(aggregator_series: set[str]) -> None:
    assert {
        "fedmq_updates_rejected_total", "fedmq_round_seconds_bucket", "fedmq_round_seconds_sum",
        "fedmq_round_seconds_count", "fedmq_online_devices", "fedmq_bytes_out_total",
    } <= aggregator_series
    # a counter's family name is not a series: a query on it would never match anything
    assert "fedmq_bytes_in" not in aggregator_series
    assert metric_names("rate(fedmq_bytes_in[5m])") - aggregator_series == {"fedmq_bytes_in"}


# --------------------------------------------------------------------------- alert rules
def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


ALERT_NAMES = [rule["alert"] for rule in alert_rules()]


def run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, check=False)


@needs_promtool
def test_promtool_check_rules() -> None:
    done = run_promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in done.stdout


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    done = run_promtool("test", "rules", str(ALERTS_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "FAILED" not in done.stdout


@needs_promtool
def test_promtool_rule_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The unit tests pin the thresholds: a rule loosened by a typo fails them."""
    text = ALERTS.read_text()
    assert text.count("< 0.5 * max_over_time") == 1
    (tmp_path / "alerts.yml").write_text(text.replace("< 0.5 * max_over_time",
                                                      "< 0.7 * max_over_time"))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts.test.yml")
    done = run_promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert done.returncode == 1
    assert "alertname: FedmqDevicesDropped" in done.stdout + done.stderr


@needs_promtool
def test_example_prometheus_config_is_valid() -> None:
    done = run_promtool("check", "config", str(PROMETHEUS_EXAMPLE))
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(PROMETHEUS_EXAMPLE.read_text())
    assert config["rule_files"] == [ALERTS.name]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert "fedmq-aggregator" in jobs
    assert 'up{job="fedmq-aggregator"}' in ALERTS.read_text()


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    for name in ALERT_NAMES:
        assert True in cases.get(name, []), f"{name} is never tested firing"
        assert False in cases.get(name, []), f"{name} is never tested staying quiet"
    assert set(cases) == set(ALERT_NAMES), "tests for alerts that do not exist"


def test_every_alert_is_documented_with_its_runbook_anchor() -> None:
    docs = DOCS.read_text()
    for rule in alert_rules():
        name = rule["alert"]
        assert re.search(rf"^### {name}$", docs, re.M), f"{name}: no '### {name}' in {DOCS}"
        assert rule["annotations"]["runbook"] == f"docs/monitoring.md#{name.lower()}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_query_only_exported_or_documented_series(aggregator_series: set[str]) -> None:
    used: set[str] = set()
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric in {rule['expr']!r}"
        ours = {n for n in names if n.startswith("fedmq_")}
        missing = ours - aggregator_series
        assert not missing, f"{rule['alert']}: not exported by the aggregator: {missing}"
        used |= names - ours
    assert used == EXTERNAL_SERIES
    docs = DOCS.read_text()
    for name in sorted(EXTERNAL_SERIES):
        assert f"`{name}`" in docs, f"{name} (needed by the rules) is not in {DOCS}"


def test_privacy_budget_alerts_read_the_dp_gauges(aggregator_series: set[str]) -> None:
    """With `dp = true` and a `dp_epsilon_budget`: one alert when 90 % of it is spent, one
    when the next round would exceed it (no round opens any more)."""
    rules = {r["alert"]: r for r in alert_rules()}
    nearly = rules["FedmqPrivacyBudgetNearlySpent"]["expr"]
    assert metric_names(nearly) == {"fedmq_dp_epsilon", "fedmq_dp_epsilon_budget"}
    assert "0.9 * fedmq_dp_epsilon_budget" in nearly
    exhausted = rules["FedmqPrivacyBudgetExhausted"]["expr"]
    assert metric_names(exhausted) == {"fedmq_dp_budget_exhausted"}
    assert {"fedmq_dp_epsilon_budget", "fedmq_dp_budget_exhausted"} <= aggregator_series


# --------------------------------------------------------------------------- dashboard
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows carry theirs
    return out


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    for panel in panels():
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert m, f"variable {var['name']}: unsupported query {query!r}"
            yield f"variable {var['name']}", m.group(1)


def _datasources(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            else:
                yield from _datasources(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasources(item)


def test_dashboard_is_import_ready() -> None:
    dash = dashboard()
    assert dash["__inputs"] == [{
        "name": "DS_PROMETHEUS", "label": "Prometheus",
        "description": "The Prometheus that scrapes the fedmq aggregator",
        "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus",
    }]
    assert dash["id"] is None and dash["uid"] and dash["title"]
    # every data source is the import input: no uid of someone's own Grafana
    sources = list(_datasources(dash["panels"])) + list(_datasources(dash["templating"]))
    assert sources and all(s == {"type": "prometheus", "uid": DS_UID} for s in sources), sources
    required = {r["id"] for r in dash["__requires"] if r["type"] == "panel"}
    ids = []
    for panel in panels():
        ids.append(panel["id"])
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in required, f"{panel['type']} missing from __requires"
        assert panel["datasource"] == {"type": "prometheus", "uid": DS_UID}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_dashboard_has_the_panels_an_operator_needs() -> None:
    titles = {p["title"] for p in panels()}
    assert {
        "Rounds per hour", "Accuracy and loss", "Participants per round",
        "Updates accepted and rejected by reason", "Bytes in and out", "Fold latency",
        "Round latency", "Devices online", "Per-device last round",
    } <= titles


def test_dashboard_queries_only_exported_metrics(aggregator_series: set[str]) -> None:
    agent_series = set(AGENT_METRICS)
    seen_ours: set[str] = set()
    for where, expr in queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - aggregator_series - agent_series
        assert not unknown, f"{where}: {sorted(unknown)} not exported by the aggregator: {expr}"
        seen_ours |= names & aggregator_series
    # every metric family of the aggregator is on the dashboard somewhere
    families = {f.name for f in AggregatorMetrics().registry.collect()}
    shown = {f for f in families if any(n == f or n.startswith(f + "_") for n in seen_ours)}
    assert shown == families, f"not on the dashboard: {sorted(families - shown)}"


@needs_promtool
def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Each query (Grafana variables substituted) as a recording rule: promtool parses it."""
    rules = []
    for i, (where, expr) in enumerate(queries()):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run_promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_make_test_installs_promtool() -> None:
    """CI runs `make test` on a fresh Debian 12: the promtool tests must not be skipped there."""
    makefile = (ROOT / "Makefile").read_text()
    m = re.search(r"^APT_PACKAGES :=(.*)$", makefile, re.M)
    assert m, "no APT_PACKAGES line in the Makefile"
    assert "prometheus" in m.group(1).split()
