"""Deployment artefacts under deploy/: what can be checked without root, systemd or Docker.

- the systemd unit: ``systemd-analyze verify`` and ``security --offline`` on it, its directives;
- the example agent configuration: every setting documented, every value loads;
- the aggregator configs (compose, Kubernetes) load and agree with the image's contract;
- compose.yaml, the Kubernetes manifests and the Dockerfile: shape and cross-references;
- install-agent.sh: shellcheck, dry run, and (slow) a real install into a throwaway prefix
  whose venv runs ``fedmq`` without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.packaging import copy_sources

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "fedmq-agent.service"
AGENT_TOML = DEPLOY / "systemd" / "agent.toml.example"
AGENT_ENV = DEPLOY / "systemd" / "agent.env.example"
INSTALL = DEPLOY / "install-agent.sh"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "k8s"
DOCS = ROOT / "docs" / "deployment.md"
STATE_DIR = "/var/lib/fedmq"
METRICS_PORT = 9108

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)"
)


# ---------------------------------------------------------------------------- helpers
def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]} (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def stub_unit(tmp_path: Path, unit_text: str) -> Path:
    """The unit with ExecStart pointing at an executable that exists here."""
    stub = tmp_path / "fedmq"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    path = tmp_path / UNIT.name
    path.write_text(unit_text.replace("/opt/fedmq/venv/bin/fedmq", str(stub)))
    return path


def verify_unit(path: Path) -> None:
    """``systemd-analyze verify`` passes and says nothing about this unit."""
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    about_unit = [line for line in output.splitlines() if path.name in line]
    assert not about_unit, "systemd-analyze verify complained:\n" + "\n".join(about_unit)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    out: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend((path, doc) for doc in yaml_docs(path))
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    assert not pending, "Dockerfile ends with a continuation"
    return out


def expand_extra(extra: str) -> list[str]:
    """The requirements of a pyproject extra, self-references (fedmq[x]) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    reqs: list[str] = list(project["dependencies"])
    todo, seen = [extra], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in extras[name]:
            m = re.fullmatch(r"fedmq\[([^\]]+)\]", req.strip())
            if m:
                todo.extend(x.strip() for x in m.group(1).split(","))
            else:
                reqs.append(req)
    return reqs


def requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r.strip(), maxsplit=1)[0].lower() for r in reqs}


# ---------------------------------------------------------------------------- systemd unit
def test_unit_directives() -> None:
    unit = parse_unit(UNIT.read_text())
    svc, head = unit["Service"], unit["Unit"]
    expected = {
        "Type": "notify",
        "User": "fedmq",
        "Group": "fedmq",
        "ExecStart": "/opt/fedmq/venv/bin/fedmq agent --config /etc/fedmq/agent.toml",
        "EnvironmentFile": "-/etc/fedmq/agent.env",
        "StateDirectory": "fedmq-agent",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "Restart": "on-failure",
        "MemoryMax": "300M",
    }
    for key, value in expected.items():
        assert unit_values(svc, key) == [value], key
    assert unit_values(svc, "WatchdogSec"), "the agent pings the watchdog: WatchdogSec= is needed"
    assert unit_values(svc, "RestartSec")
    assert unit_values(head, "StartLimitBurst") and unit_values(head, "StartLimitIntervalSec")
    # Bookworm's systemd 252 does not know these (added in 254): verify would warn.
    assert not unit_values(svc, "RestartSteps") and not unit_values(svc, "RestartMaxDelaySec")
    # Writable: the state directory only.
    assert not unit_values(svc, "ReadWritePaths")
    assert unit_values(unit["Install"], "WantedBy") == ["multi-user.target"]


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    verify_unit(stub_unit(tmp_path, UNIT.read_text()))


@needs_systemd_analyze
def test_systemd_analyze_catches_unknown_directives(tmp_path: Path) -> None:
    """The verify check above is not vacuous: an unknown key is reported."""
    text = UNIT.read_text().replace("[Service]\n", "[Service]\nRestartSteps=5\n", 1)
    with pytest.raises(AssertionError, match="RestartSteps"):
        verify_unit(stub_unit(tmp_path, text))


@needs_systemd_analyze
def test_unit_sandbox_exposure_is_low(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    path = stub_unit(tmp_path, UNIT.read_text())
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--threshold=30", "--no-pager", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    output = proc.stdout + proc.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert m, output
    assert float(m.group(1)) <= 3.0, output
    assert proc.returncode == 0, output


# ---------------------------------------------------------------------------- agent config
def test_agent_toml_example_documents_every_setting_and_loads(tmp_path: Path) -> None:
    agent_config = pytest.importorskip("edge_agent.config")
    text = AGENT_TOML.read_text()
    mqtt = pytest.importorskip("fedmq.net.mqtt")
    names = {f.name for f in dataclasses.fields(agent_config.AgentConfig)} - {"mqtt"}
    names |= {f.name for f in dataclasses.fields(mqtt.MqttSettings)
              if f.metadata.get("setting", True)} - {"client_id"}  # agent: the device id
    undocumented = {n for n in names if not re.search(rf"^#?{n} = ", text, re.MULTILINE)}
    assert not undocumented, f"settings missing from {AGENT_TOML.name}: {sorted(undocumented)}"
    cfg = agent_config.load_agent_config(AGENT_TOML, environ={})
    assert str(cfg.state_dir) == "/var/lib/fedmq-agent"  # the unit's StateDirectory=
    # Every commented example value is a valid setting too.
    uncommented = re.sub(r"^#(\w+ = )", r"\1", text, flags=re.MULTILINE)
    path = tmp_path / "agent.toml"
    path.write_text(uncommented)
    full = agent_config.load_agent_config(path, environ={})
    assert full.mqtt.username == "pi-0001" and full.mqtt.tls_cert is not None


def test_agent_env_example_names_real_settings() -> None:
    agent_config = pytest.importorskip("edge_agent.config")
    keys = re.findall(r"^#?(FEDMQ_AGENT_\w+)=", AGENT_ENV.read_text(), re.MULTILINE)
    assert "FEDMQ_AGENT_MQTT_PASSWORD" in keys
    # Every name is a real setting: loading refuses unknown FEDMQ_AGENT_* variables.
    env = {k: "" for k in keys} | {"FEDMQ_AGENT_MQTT_PASSWORD": "x",
                                   "FEDMQ_AGENT_MQTT_USERNAME": "pi"}
    env["FEDMQ_AGENT_DEVICE_ID"] = "pi-0001"
    env["FEDMQ_AGENT_SOURCE"] = "npz:/var/lib/fedmq-agent/data/local.npz"
    cfg = agent_config.load_agent_config(AGENT_TOML, environ=env)
    assert cfg.mqtt.password == "x" and cfg.signing_key is None


# ---------------------------------------------------------------------------- aggregator configs
def aggregator_tomls() -> dict[str, str]:
    cm = next(doc for _, doc in k8s_objects() if doc["kind"] == "ConfigMap"
              and doc["metadata"]["name"] == "fedmq-aggregator-config")
    return {
        "compose": (DEPLOY / "compose" / "aggregator.toml").read_text(),
        "k8s": cm["data"]["aggregator.toml"],
    }


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_aggregator_config_loads(where: str, tmp_path: Path) -> None:
    agg_config = pytest.importorskip("aggregator.config")
    path = tmp_path / "aggregator.toml"
    path.write_text(aggregator_tomls()[where])
    # The image's environment (Dockerfile ENV) on top, as in the container.
    env = {"FEDMQ_AGGREGATOR_STATE_DIR": STATE_DIR,
           "FEDMQ_AGGREGATOR_METRICS_PORT": str(METRICS_PORT),
           "FEDMQ_AGGREGATOR_METRICS_HOST": "0.0.0.0",
           "FEDMQ_AGGREGATOR_MQTT_USERNAME": "aggregator",
           "FEDMQ_AGGREGATOR_MQTT_PASSWORD": "x"}
    cfg = agg_config.load_aggregator_config(path, environ=env)
    assert str(cfg.state_dir) == STATE_DIR
    assert cfg.metrics_port == METRICS_PORT and cfg.metrics_host == "0.0.0.0"
    assert cfg.mqtt.tls_ca == "/etc/fedmq/tls/ca.crt" and cfg.mqtt.port == 8883
    plain = agg_config.load_aggregator_config(path, environ={})
    assert str(plain.state_dir) == STATE_DIR and plain.metrics_port == METRICS_PORT


# ---------------------------------------------------------------------------- Dockerfile
def test_dockerfile_shape() -> None:
    instrs = dockerfile_instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in instrs if i == "ARG" and "=" in a}
    froms = [a for i, a in instrs if i == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    base = args["PYTHON_IMAGE"]
    assert base.startswith("python:3.11-slim"), base
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)
    # Runs as a non-root numeric user (Kubernetes runAsNonRoot can check it).
    users = [a for i, a in instrs if i == "USER"]
    assert users, "no USER instruction: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert ("ENTRYPOINT", '["fedmq", "aggregator"]') in instrs
    assert ("EXPOSE", str(METRICS_PORT)) in instrs
    assert ("VOLUME", f'["{STATE_DIR}"]') in instrs
    assert any(i == "HEALTHCHECK" and "/metrics" in a for i, a in instrs)
    env = " ".join(a for i, a in instrs if i == "ENV")
    assert f"FEDMQ_AGGREGATOR_STATE_DIR={STATE_DIR}" in env
    assert f"FEDMQ_AGGREGATOR_METRICS_PORT={METRICS_PORT}" in env
    # The aggregator's own default is loopback; in the container it must be reachable.
    assert "FEDMQ_AGGREGATOR_METRICS_HOST=0.0.0.0" in env


def test_dockerfile_installs_aggregator_extra_without_tensorflow() -> None:
    instrs = dockerfile_instructions()
    runs = [a for i, a in instrs if i == "RUN"]
    installs = [cmd.strip() for r in runs for cmd in r.split("&&") if "pip install" in cmd]
    assert installs and all(cmd.endswith('".[${FEDMQ_EXTRAS}]"') for cmd in installs), installs
    assert not [cmd for cmd in installs if re.search(r"tensorflow|keras|\[(ml|dev|demo)", cmd)]
    extras_arg = next(a for i, a in instrs if i == "ARG" and a.startswith("FEDMQ_EXTRAS="))
    extras = extras_arg.split("=", 1)[1].strip("\"'").split(",")
    assert extras == ["aggregator"]
    names = set().union(*(requirement_names(expand_extra(e)) for e in extras))
    assert "prometheus-client" in names and "ai-edge-litert" in names
    assert not {n for n in names if n.startswith(("tensorflow", "keras"))}, names
    # The build itself refuses an image with TensorFlow in it.
    assert any("find_spec('tensorflow')" in r for r in runs)


def test_dockerignore_admits_what_the_dockerfile_copies() -> None:
    rules = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", ".dockerignore should be an allowlist"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for instr, args in dockerfile_instructions():
        if instr != "COPY" or args.startswith("--from"):
            continue
        for src in args.split()[:-1]:
            assert src in allowed, f"COPY {src} is excluded by .dockerignore"
            assert (ROOT / src).exists(), src
    assert not {".venv", ".git"} & allowed


# ---------------------------------------------------------------------------- compose
def test_compose_services_volumes_and_mounts() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"mosquitto", "aggregator"}
    assert set(compose["volumes"]) == {"aggregator-state", "mosquitto-data"}
    mosq, agg = services["mosquitto"], services["aggregator"]
    assert mosq["image"] == "eclipse-mosquitto:2"
    for svc in (mosq, agg):
        assert svc["restart"] in ("unless-stopped", "always", "on-failure")
        assert svc["healthcheck"]["test"]
    assert agg["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    context = (COMPOSE.parent / agg["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / agg["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "127.0.0.1:9108:9108" in agg["ports"] and "8883:8883" in mosq["ports"]
    assert agg["read_only"] is True and agg["cap_drop"] == ["ALL"]
    # Secrets come from .env, never from the file.
    assert "${FEDMQ_AGGREGATOR_MQTT_PASSWORD:?" in (
        agg["environment"]["FEDMQ_AGGREGATOR_MQTT_PASSWORD"])

    def mounts(svc: dict[str, Any]) -> dict[str, str]:
        out = {}
        for spec in svc["volumes"]:
            src, target = spec.split(":")[:2]
            out[target] = src
        return out

    m_mounts, a_mounts = mounts(mosq), mounts(agg)
    assert m_mounts == {
        "/mosquitto/config/mosquitto.conf": "../../broker/mosquitto.conf",
        "/mosquitto/config/certs": "../../broker/certs",
        "/mosquitto/config/passwd": "../../broker/passwd",
        "/mosquitto/config/acl": "../../broker/acl",
        "/mosquitto/data": "mosquitto-data",
    }
    assert a_mounts[STATE_DIR] == "aggregator-state"
    assert a_mounts["/etc/fedmq/aggregator.toml"] == "./aggregator.toml"
    assert a_mounts["/etc/fedmq/tls/ca.crt"] == "../../broker/certs/ca.crt"
    # The health check must not log in as the aggregator: the client id is bound to the
    # username, so it would disconnect the aggregator at every check.
    check = " ".join(mosq["healthcheck"]["test"])
    assert "-u monitor" in check and "AGGREGATOR" not in check and "aggregator" not in check
    assert "-p 1883" in check and "-h 127.0.0.1" in check  # the loopback health listener
    assert not any("AGGREGATOR" in k for k in mosq.get("environment", {}))
    assert "${FEDMQ_MONITOR_PASSWORD:?" in mosq["environment"]["FEDMQ_MONITOR_PASSWORD"]


def test_compose_bind_mounts_exist_or_are_documented() -> None:
    """Every host path compose mounts is in the repo, or made by a command in the docs."""
    compose = yaml.safe_load(COMPOSE.read_text())
    docs = DOCS.read_text()
    # The broker tooling writes exactly the paths compose mounts: no copy steps.
    assert re.search(r"fedmq broker init --dir broker\b[^\n]*--hostname mosquitto", docs)
    assert re.search(r"fedmq broker add-device \S+ --dir broker\b", docs)
    assert "broker/generated" not in docs and not re.search(r"^cp broker/", docs, re.M)
    named = set(compose["volumes"])
    for name, svc in compose["services"].items():
        for spec in svc["volumes"]:
            src = spec.split(":")[0]
            if src in named:
                continue
            path = (COMPOSE.parent / src).resolve()
            rel = path.relative_to(ROOT).as_posix()  # raises if outside the repo
            if path.exists():
                continue
            assert rel.startswith("broker/"), f"{name}: {src} does not exist"
            assert rel in docs, f"{name}: {rel} is neither present nor documented in {DOCS}"


def test_aggregator_client_id_is_its_username_and_the_health_listener_matches() -> None:
    compose_toml = tomllib.loads((DEPLOY / "compose" / "aggregator.toml").read_text())
    agg = compose_toml["aggregator"]
    assert compose_toml["mqtt"]["client_id"] == compose_toml["mqtt"]["username"] == "aggregator"
    assert agg["registry"].startswith(STATE_DIR + "/")
    sts = next(doc for _, doc in k8s_objects() if doc["kind"] == "StatefulSet")
    [container] = [c for c in sts["spec"]["template"]["spec"]["containers"]
                   if any(e["name"] == "FEDMQ_AGGREGATOR_MQTT_USERNAME"
                          for e in c.get("env", []))]
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["FEDMQ_AGGREGATOR_MQTT_CLIENT_ID"] == env["FEDMQ_AGGREGATOR_MQTT_USERNAME"]
    broker = pytest.importorskip("fedmq_ops.broker")
    conf = broker.render_mosquitto_conf(broker.BrokerSettings())
    assert "listener 1883 127.0.0.1" in conf  # what the compose health check dials
    assert (ROOT / "broker" / "mosquitto.conf").read_text() == conf


# ---------------------------------------------------------------------------- Kubernetes
def test_k8s_manifests_shape() -> None:
    objs = k8s_objects()
    assert objs
    for path, doc in objs:
        assert doc.get("apiVersion") and doc.get("kind"), path
        meta = doc.get("metadata") or {}
        assert meta.get("name"), path
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == "fedmq", f"{path}: {doc['kind']} {meta['name']}"
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in objs}
    assert {("Namespace", "fedmq"), ("ConfigMap", "fedmq-aggregator-config"),
            ("Secret", "fedmq-mqtt"), ("StatefulSet", "fedmq-aggregator"),
            ("Service", "fedmq-aggregator"), ("Service", "fedmq-aggregator-metrics"),
            ("Deployment", "mosquitto"), ("Service", "mosquitto"),
            ("PersistentVolumeClaim", "mosquitto-data")} <= kinds


def test_k8s_statefulset() -> None:
    objs = [doc for _, doc in k8s_objects()]
    sts = next(d for d in objs if d["kind"] == "StatefulSet")
    spec = sts["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    # Service links would set FEDMQ_AGGREGATOR_PORT=tcp://... (read as the broker port).
    assert pod["enableServiceLinks"] is False
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": METRICS_PORT}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("metrics", METRICS_PORT), probe
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[STATE_DIR] == claim["metadata"]["name"]
    assert "ReadWriteOnce" in claim["spec"]["accessModes"]
    # Every other mount is a declared volume; configs and secrets exist as objects.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts.values()) - {claim["metadata"]["name"]} <= set(volumes)
    names = {(d["kind"], d["metadata"]["name"]) for d in objs}
    for vol in volumes.values():
        if "configMap" in vol:
            assert ("ConfigMap", vol["configMap"]["name"]) in names
        if "secret" in vol:
            assert ("Secret", vol["secret"]["secretName"]) in names
    for env in container["env"]:
        ref = env["valueFrom"]["secretKeyRef"]
        secret = next(d for d in objs if d["kind"] == "Secret"
                      and d["metadata"]["name"] == ref["name"])
        assert ref["key"] in secret["stringData"]
    governing = next(d for d in objs if d["kind"] == "Service"
                     and d["metadata"]["name"] == spec["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    for svc in (d for d in objs if d["kind"] == "Service"):
        target = "mosquitto" if svc["metadata"]["name"] == "mosquitto" else "fedmq-aggregator"
        assert svc["spec"]["selector"] == {"app.kubernetes.io/name": target}


def test_k8s_kustomizations_list_the_manifests() -> None:
    for kdir in (K8S, K8S / "mosquitto"):
        kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
        listed = set(kust["resources"])
        present = {p.name for p in kdir.glob("*.yaml")} - {"kustomization.yaml"}
        # The secret template is applied by hand, on purpose.
        assert listed == present - {"secret.template.yaml"}, kdir
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    for kdir in (K8S, K8S / "mosquitto"):
        proc = subprocess.run([kubectl, "kustomize", str(kdir)], capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert yaml_docs_from(proc.stdout)


def yaml_docs_from(text: str) -> list[Any]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


# ---------------------------------------------------------------------------- install script
def test_install_script_is_shellcheck_clean() -> None:
    assert INSTALL.stat().st_mode & stat.S_IXUSR, "install-agent.sh should be executable"
    assert "set -euo pipefail" in INSTALL.read_text()
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, str(INSTALL)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def run_install(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALL), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        check=False,
    )


def test_install_script_dry_run_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    proc = run_install("--dry-run", "--no-user", "--no-systemd", "--prefix", str(prefix),
                       "--source", "fedmq==0.1.0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not prefix.exists()
    assert "fedmq\\[edge\\]==0.1.0" in proc.stdout
    assert f"{prefix}/opt/fedmq/venv/bin/python -m pip install" in proc.stdout


def test_install_script_rejects_bad_input_before_changing_anything(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    proc = run_install("--no-user", "--no-systemd", "--prefix", str(prefix),
                       "--source", "./no-such.whl", cwd=tmp_path)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    proc = run_install("--bogus", cwd=tmp_path)
    assert proc.returncode != 0 and "unknown option" in proc.stderr
    assert not prefix.exists()
    if os.geteuid() != 0:
        proc = run_install("--prefix", str(prefix), "--source", str(ROOT), cwd=tmp_path)
        assert proc.returncode != 0 and "root" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_install_script_real_install_into_prefix(tmp_path: Path) -> None:
    """A real install of fedmq[edge] from a source checkout: fedmq runs, TensorFlow is absent,
    the unit points at the venv and verifies, config files get safe modes, a re-run keeps them.
    """
    src = copy_sources(tmp_path / "src")
    prefix = tmp_path / "root"
    args = ("--no-user", "--no-systemd", "--prefix", str(prefix), "--source", str(src),
            "--python", sys.executable)
    proc = run_install(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    venv = prefix / "opt/fedmq/venv"
    fedmq = venv / "bin/fedmq"
    python = venv / "bin/python"

    help_out = subprocess.run([str(fedmq), "--help"], capture_output=True, text=True,
                              timeout=120, check=True).stdout
    assert re.search(r"^\s+agent\s", help_out, re.MULTILINE), help_out
    no_tf = subprocess.run([str(python), "-c", "import tensorflow"], capture_output=True,
                           text=True, timeout=120, check=False)
    assert no_tf.returncode != 0 and "No module named 'tensorflow'" in no_tf.stderr
    modules = ["edge_agent", "paho.mqtt.client", "msgpack", "numpy", "cryptography"]
    if platform.machine() in ("x86_64", "aarch64"):
        modules.append("ai_edge_litert.interpreter")
    subprocess.run([str(python), "-c", "import " + ", ".join(modules)], check=True, timeout=120)

    etc = prefix / "etc/fedmq"
    assert stat.S_IMODE((etc / "agent.env").stat().st_mode) == 0o600
    assert stat.S_IMODE((etc / "agent.toml").stat().st_mode) == 0o640
    assert stat.S_IMODE(etc.stat().st_mode) == 0o750
    unit_path = prefix / "etc/systemd/system/fedmq-agent.service"
    unit = parse_unit(unit_path.read_text())
    assert unit_values(unit["Service"], "ExecStart") == [
        f"{fedmq} agent --config {etc}/agent.toml"
    ]
    assert unit_values(unit["Service"], "EnvironmentFile") == [f"-{etc}/agent.env"]
    if SYSTEMD_ANALYZE is not None:
        verify_unit(unit_path)  # the real ExecStart exists now

    # The installed agent reads the installed config.
    shown = subprocess.run([str(fedmq), "agent", "--config", str(etc / "agent.toml"),
                            "--print-config"], capture_output=True, text=True, timeout=120,
                           check=False)
    assert shown.returncode == 0, shown.stderr
    assert '"host": "mqtt.example.com"' in shown.stdout

    # Idempotent: a second run succeeds and keeps the operator's edits.
    edited = (etc / "agent.toml").read_text() + "# edited by the operator\n"
    (etc / "agent.toml").write_text(edited)
    proc = run_install(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (etc / "agent.toml").read_text() == edited
    assert "is up to date" in proc.stdout


def test_container_tests_allow_for_cold_image_builds() -> None:
    """The image builds run inside the first container test that needs them (session
    fixtures), so its pytest-timeout must cover base + aggregator + mosquitto builds: with
    the default 600 s, a fresh machine under load failed (base image 493 s)."""
    from tests.integration import test_container

    [mark] = [m for m in test_container.pytestmark if m.name == "timeout"]
    assert mark.args[0] >= 3 * test_container.BUILD_TIMEOUT + 300



def test_arm64_install_tests_allow_for_a_cold_root() -> None:
    """Likewise the arm64 root (debootstrap under qemu, bound TIMEOUT) is built inside the
    first arm64 test: its pytest-timeout must exceed that bound (cold: 381 s under load)."""
    from tests.integration import test_arm64_install

    [mark] = [m for m in test_arm64_install.pytestmark if m.name == "timeout"]
    assert mark.args[0] >= test_arm64_install.TIMEOUT + 300
