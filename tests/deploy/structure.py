#!/usr/bin/env python3
"""Structural checks of the deployment files that no linter makes.

Each check is a function below; tests/deploy/check.sh runs them one by one:

    python3 tests/deploy/structure.py CHECK

and one prints the real-token variant of docker-compose.yml (its commented
lines switched on) for `docker-compose config` to validate:

    python3 tests/deploy/structure.py compose-real-token-variant

A check prints what is wrong and exits 1, or prints nothing and exits 0.
"""

import json
import pathlib
import re
import subprocess
import sys
import tempfile

import yaml

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no __pycache__ beside the sibling scripts

import dashboard_exprs  # noqa: E402  (sibling script)
import rule_exprs  # noqa: E402

ROOT = HERE.parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "dashboards" / "cloudflare-access-exporter.json"
UNIT = DEPLOY / "systemd" / "cloudflare-access-exporter.service"

NAME = "cloudflare-access-exporter"
PORT = 10410
SECRET_DIR = "/etc/cloudflare-access-exporter/secrets"

# Metrics that carry the per-test labels, and so must be filtered by the
# dashboard's $account and $policy_test variables.
PER_TEST_PREFIX = "cloudflare_access_policy_test_"
METRIC = re.compile(r"\b(cloudflare_access_[a-z0-9_]+)")


class Problems(list):
    """Collects failures; `check` adds one when a condition is false."""

    def check(self, condition, message):
        if not condition:
            self.append(message)
        return condition


def load_yaml(path):
    return yaml.safe_load(pathlib.Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- container


def dockerignore(p):
    """.dockerignore keeps build output and git history out of the context."""
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    entries = {line.strip("/") for line in lines if not line.startswith("#")}
    for entry in ("target", ".git"):
        p.check(entry in entries, f".dockerignore does not exclude {entry}/")


def dockerfile(p):
    """The image builds locked, runs non-root, exposes the port, has OCI labels."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    p.check("cargo build --profile dist --locked" in text, "no `cargo build --profile dist --locked`")
    p.check(re.search(r"^FROM rust:\S*bookworm", text, re.M), "builder is not rust:*-bookworm")
    p.check(re.search(r"^FROM gcr\.io/distroless/cc-debian12:nonroot", text, re.M),
            "final image is not distroless cc-debian12:nonroot")
    p.check(re.search(r"^USER 65532", text, re.M), "no numeric non-root USER")
    p.check(re.search(rf"^EXPOSE {PORT}$", text, re.M), f"does not EXPOSE {PORT}")
    p.check(f'ENTRYPOINT ["/{NAME}"]' in text, f"ENTRYPOINT is not /{NAME}")
    for label in ("title", "description", "licenses", "version", "revision", "created"):
        p.check(f"org.opencontainers.image.{label}=" in text, f"no OCI label {label}")


def compose(p):
    """The compose stack wires the exporter, Prometheus, Alertmanager, Grafana."""
    doc = load_yaml(DEPLOY / "docker-compose.yml")
    services = doc.get("services", {})
    for name in ("exporter", "prometheus", "alertmanager", "grafana"):
        p.check(name in services, f"no service {name}")
    if p:
        return
    exporter = services["exporter"]
    p.check(exporter.get("build", {}).get("dockerfile") == "deploy/Dockerfile",
            "exporter is not built from deploy/Dockerfile")
    p.check(exporter.get("command") == ["--demo"], "exporter command is not --demo")
    p.check(f"{PORT}:{PORT}" in exporter.get("ports", []), f"exporter does not publish {PORT}")

    # Every bind-mounted path exists in the repository.
    for sname, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                p.check((DEPLOY / source).exists(),
                        f"{sname}: bind-mount source {source} does not exist")

    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]]
    p.check(f"exporter:{PORT}" in targets, f"prometheus.yml does not scrape exporter:{PORT}")
    p.check("alerts.yml" in prom.get("rule_files", []), "prometheus.yml does not load alerts.yml")
    am = [t for a in prom["alerting"]["alertmanagers"] for sc in a["static_configs"]
          for t in sc["targets"]]
    p.check("alertmanager:9093" in am, "prometheus.yml does not send to alertmanager:9093")
    jobs = [job["job_name"] for job in prom["scrape_configs"]]
    p.check(any(re.fullmatch(".*cloudflare-access.*", j) for j in jobs),
            "no scrape job matches CloudflareAccessExporterDown's job regex")

    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = [d for f in (provisioning / "datasources").glob("*.yml")
                   for d in load_yaml(f).get("datasources", [])]
    p.check(any(d.get("type") == "prometheus" and d.get("url") == "http://prometheus:9090"
                for d in datasources), "no Grafana datasource for http://prometheus:9090")
    providers = [d for f in (provisioning / "dashboards").glob("*.yml")
                 for d in load_yaml(f).get("providers", [])]
    paths = {d.get("options", {}).get("path") for d in providers}
    mounts = [str(v) for v in services["grafana"].get("volumes", [])]
    p.check(any(v.startswith("../dashboards:") and v.split(":")[1] in paths for v in mounts),
            "the dashboards provider path is not where ../dashboards is mounted")


def compose_real_token_variant():
    """Print docker-compose.yml with its commented real-token lines enabled."""
    lines = (DEPLOY / "docker-compose.yml").read_text(encoding="utf-8").splitlines()
    out, in_exporter_block, in_secrets_block = [], False, False
    for line in lines:
        if line.strip() == 'command: ["--demo"]':
            continue
        if line.strip() == "# command:":
            in_exporter_block = True
        if line.strip() == "# secrets:" and not line.startswith(" "):
            in_secrets_block = True
        if (in_exporter_block or in_secrets_block) and line.lstrip().startswith("#"):
            if line.strip() in ("#",):
                continue
            indent = len(line) - len(line.lstrip())
            out.append(" " * indent + line.lstrip()[2:])
            continue
        in_exporter_block = False
        out.append(line)
    print("\n".join(out))


# --------------------------------------------------------------- kubernetes


def kustomization(p):
    """kustomization.yaml lists every manifest but the example Secret."""
    doc = load_yaml(K8S / "kustomization.yaml")
    resources = doc.get("resources", [])
    for r in resources:
        p.check((K8S / r).exists(), f"resource {r} does not exist")
    manifests = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    p.check(set(resources) == manifests - {"secret.example.yaml"},
            f"resources {sorted(resources)} differ from the manifests {sorted(manifests)}")
    p.check("secret.example.yaml" not in resources, "the example Secret is applied")
    images = {i["name"] for i in doc.get("images", [])}
    deployment = load_yaml(K8S / "deployment.yaml")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    p.check(image in images, f"image {image} is not set in kustomization images")


def deployment(p):
    """The Deployment is locked down, probed, and reads config and token files."""
    doc = load_yaml(K8S / "deployment.yaml")
    pod = doc["spec"]["template"]["spec"]
    labels = doc["spec"]["template"]["metadata"]["labels"]
    p.check(doc["spec"]["selector"]["matchLabels"].items() <= labels.items(),
            "selector does not match the pod labels")
    (container,) = pod["containers"]
    sc = container.get("securityContext", {})
    psc = pod.get("securityContext", {})
    p.check(sc.get("runAsNonRoot") or psc.get("runAsNonRoot"), "runAsNonRoot is not set")
    p.check(sc.get("readOnlyRootFilesystem") is True, "root filesystem is writable")
    p.check(sc.get("allowPrivilegeEscalation") is False, "privilege escalation allowed")
    p.check(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities not dropped")
    seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
    p.check(seccomp.get("type") == "RuntimeDefault", "seccomp profile is not RuntimeDefault")

    port = {x["name"]: x["containerPort"] for x in container["ports"]}
    p.check(port.get("metrics") == PORT, f"no container port metrics={PORT}")
    p.check(container["livenessProbe"]["httpGet"]["path"] == "/-/healthy",
            "liveness probe is not /-/healthy")
    p.check(container["readinessProbe"]["httpGet"]["path"] == "/-/ready",
            "readiness probe is not /-/ready")
    res = container.get("resources", {})
    p.check(res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory")
            and res.get("limits", {}).get("memory"), "resource requests/limits missing")

    args = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    token = args.get("--cloudflare.api-token-file", "")
    p.check(token == f"{SECRET_DIR}/api-token", f"token file is {token!r}")
    secret_volume = [n for n, v in volumes.items() if "secret" in v]
    p.check(len(secret_volume) == 1, "expected one secret volume")
    if secret_volume:
        volume = volumes[secret_volume[0]]["secret"]
        p.check(volume["secretName"] == NAME, f"Secret is not named {NAME}")
        keys = {i["key"]: i["path"] for i in volume.get("items", [])} or {"api-token": "api-token"}
        p.check(keys.get("api-token") == "api-token", "Secret key api-token is not mounted")
        p.check(mounts.get(secret_volume[0]) == SECRET_DIR, f"Secret not mounted at {SECRET_DIR}")

    config = args.get("--config.file", "")
    cm_volume = [n for n, v in volumes.items() if "configMap" in v]
    p.check(len(cm_volume) == 1, "expected one configMap volume")
    if cm_volume:
        cm_name = volumes[cm_volume[0]]["configMap"]["name"]
        configmap = load_yaml(K8S / "configmap.yaml")
        p.check(configmap["metadata"]["name"] == cm_name, "ConfigMap name mismatch")
        mount = mounts.get(cm_volume[0], "")
        key = config[len(mount) + 1:] if config.startswith(mount + "/") else None
        p.check(key in configmap["data"], f"--config.file {config} is not a ConfigMap key")

    service = load_yaml(K8S / "service.yaml")
    sports = {x["name"]: x for x in service["spec"]["ports"]}
    p.check("metrics" in sports and sports["metrics"]["port"] == PORT,
            f"Service has no port metrics={PORT}")
    p.check(service["spec"]["selector"].items() <= labels.items(),
            "Service selector does not match the pods")


def servicemonitor(p):
    """The ServiceMonitor selects the Service and scrapes its metrics port."""
    doc = load_yaml(K8S / "servicemonitor.yaml")
    p.check(doc.get("apiVersion") == "monitoring.coreos.com/v1", "wrong apiVersion")
    p.check(doc.get("kind") == "ServiceMonitor", "wrong kind")
    p.check(doc.get("metadata", {}).get("name") == NAME, "wrong name")
    spec = doc.get("spec", {})
    allowed = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
               "podTargetLabels", "sampleLimit", "attachMetadata"}
    p.check(set(spec) <= allowed, f"unknown spec fields {set(spec) - allowed}")
    service = load_yaml(K8S / "service.yaml")
    match = spec.get("selector", {}).get("matchLabels", {})
    p.check(match and match.items() <= service["metadata"]["labels"].items(),
            "selector does not match the Service labels")
    endpoints = spec.get("endpoints", [])
    p.check(len(endpoints) == 1, "expected one endpoint")
    for ep in endpoints:
        p.check(ep.get("port") == "metrics", "endpoint port is not `metrics`")
        p.check(ep.get("path", "/metrics") == "/metrics", "endpoint path is not /metrics")
        for key in ("interval", "scrapeTimeout"):
            if key in ep:
                p.check(re.fullmatch(r"\d+(ms|s|m|h)", ep[key]), f"bad {key} {ep[key]!r}")


def prometheusrule(p):
    """The PrometheusRule carries exactly alerts.yml's groups and is up to date."""
    doc = load_yaml(K8S / "prometheusrule.yaml")
    p.check(doc.get("apiVersion") == "monitoring.coreos.com/v1", "wrong apiVersion")
    p.check(doc.get("kind") == "PrometheusRule", "wrong kind")
    p.check(doc.get("metadata", {}).get("name") == NAME, "wrong name")
    p.check(set(doc.get("spec", {})) == {"groups"}, "spec has fields other than groups")
    p.check(doc.get("spec", {}).get("groups") == load_yaml(ALERTS)["groups"],
            "spec.groups differ from deploy/prometheus/alerts.yml")
    result = subprocess.run(
        [sys.executable, str(K8S / "generate-prometheusrule.py"), "--check"],
        capture_output=True, text=True, check=False)
    p.check(result.returncode == 0,
            "generate-prometheusrule.py --check: " + result.stderr.strip())


# ------------------------------------------------------------------- alerts


def alert_style(p):
    """Alerts follow the mixin style: names, severity, summary, description."""
    names = []
    for group in load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert", "")
            names.append(name)
            p.check(re.fullmatch(r"CloudflareAccess[A-Z][A-Za-z]+", name),
                    f"{name}: not CamelCase with the CloudflareAccess prefix")
            p.check(rule.get("labels", {}).get("severity") in ("critical", "warning", "info"),
                    f"{name}: severity is not critical, warning or info")
            ann = rule.get("annotations", {})
            p.check(ann.get("summary", "").endswith("."), f"{name}: no one-sentence summary")
            description = ann.get("description", "")
            p.check(description, f"{name}: no description")
            if "absent(" not in rule["expr"]:
                p.check("$labels" in description or "$value" in description,
                        f"{name}: description is not templated")
    p.check(len(names) == len(set(names)), "duplicate alert names")


def alert_tests_cover_every_alert(p):
    """alerts_test.yml has a firing and a quiet case for every alert."""
    fires, quiet = set(), set()
    for test in load_yaml(ALERTS_TEST)["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = [name for name, _ in rule_exprs.rules(load_yaml(ALERTS))]
    for name in names:
        p.check(name in fires, f"{name}: no test where it fires")
        p.check(name in quiet, f"{name}: no test where it stays quiet")
    for name in (fires | quiet) - set(names):
        p.append(f"tests name an alert that does not exist: {name}")


# ------------------------------------------------------------------ systemd


def systemd_unit(p):
    """The unit is hardened and passes the token as a credential."""
    text = UNIT.read_text(encoding="utf-8").replace("\\\n", " ")
    directives = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            directives.setdefault(key, []).append(value)
    wanted = {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LoadCredential": "api-token:/etc/cloudflare-access-exporter/api-token",
    }
    for key, value in wanted.items():
        p.check(value in directives.get(key, []), f"{key}={value} missing")
    p.check("@system-service" in directives.get("SystemCallFilter", []),
            "SystemCallFilter=@system-service missing")
    exec_start = " ".join(directives.get("ExecStart", []))
    for part in (f"/usr/local/bin/{NAME}",
                 "--cloudflare.api-token-file=${CREDENTIALS_DIRECTORY}/api-token",
                 "--config.file=/etc/cloudflare-access-exporter/config.yml"):
        p.check(part in exec_start, f"ExecStart lacks {part}")


# ---------------------------------------------------------------- dashboard


def dashboard(p):
    """The dashboard's panels all query ${datasource} and honour the filters."""
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    p.check(doc.get("schemaVersion", 0) >= 36, "schemaVersion is older than 36")
    p.check(doc.get("uid"), "no uid")
    variables = {v["name"]: v for v in doc.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    p.check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
            "no Prometheus datasource variable named datasource")
    for name, label in (("account", "account_id"), ("policy_test", "name")):
        var = variables.get(name, {})
        query = var.get("definition", "")
        p.check(re.fullmatch(rf"label_values\(cloudflare_access_policy_test_\w+.*, {label}\)", query),
                f"variable {name} is not label_values(..., {label})")
        p.check(var.get("multi") and var.get("includeAll"), f"variable {name} is not multi/all")
        p.check(var.get("allValue") == ".*", f"variable {name}: allValue is not .*")
        p.check(var.get("datasource", {}).get("uid") == "${datasource}",
                f"variable {name} does not use ${{datasource}}")
    p.check('account_id=~"$account"' in variables.get("policy_test", {}).get("definition", ""),
            "policy_test is not filtered by $account")

    ids = []
    occupied = set()
    for panel in dashboard_exprs.panels(doc):
        title = panel.get("title", "")
        ids.append(panel.get("id"))
        g = panel.get("gridPos", {})
        cells = {(x, y) for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0))
                 for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0))}
        p.check(not cells & occupied, f"panel {title!r} overlaps another")
        p.check(g.get("x", 0) + g.get("w", 0) <= 24, f"panel {title!r} is wider than the grid")
        occupied |= cells
        if panel.get("type") == "row":
            continue
        p.check(panel.get("datasource", {}).get("uid") == "${datasource}",
                f"panel {title!r} does not use ${{datasource}}")
        targets = panel.get("targets", [])
        p.check(targets, f"panel {title!r} has no targets")
        for target in targets:
            expr = target.get("expr", "")
            p.check(expr, f"panel {title!r}: a target has no expr")
            p.check(target.get("datasource", {}).get("uid") == "${datasource}",
                    f"panel {title!r}: target {target.get('refId')} does not use ${{datasource}}")
            # Every selector of a per-test metric carries both filters.
            for match in re.finditer(rf"({PER_TEST_PREFIX}\w+)(\{{[^}}]*\}})?", expr):
                selector = match.group(2) or ""
                p.check('account_id=~"$account"' in selector
                        and 'name=~"$policy_test"' in selector,
                        f"panel {title!r}: {match.group(1)} not filtered by $account/$policy_test")
    p.check(len(ids) == len(set(ids)), "panel ids are not unique")


def dashboard_exprs_parse(p):
    """promtool parses every dashboard expression (as a recording rule)."""
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    rules = [{"record": f"dashboard:expr_{i}:check", "expr": dashboard_exprs.substitute(expr)}
             for i, (_title, expr) in enumerate(dashboard_exprs.expressions(doc))]
    p.check(rules, "no expressions found")
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "dashboard-exprs.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}),
                        encoding="utf-8")
        result = subprocess.run(["promtool", "check", "rules", str(path)],
                                capture_output=True, text=True, check=False)
    p.check(result.returncode == 0, (result.stdout + result.stderr).strip())


def metric_names(p):
    """Every metric the dashboard and the alerts use is one the exporter exports."""
    exported = set()
    for source in (ROOT / "src").rglob("*.rs"):
        exported |= set(re.findall(r'"(cloudflare_access_[a-z0-9_]+)"',
                                   source.read_text(encoding="utf-8")))
    if not p.check(exported, "no cloudflare_access_* metric names found in src/"):
        return
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used = {("dashboard", m) for _t, e in dashboard_exprs.expressions(doc)
            for m in METRIC.findall(e)}
    used |= {("alerts.yml", m) for _n, e in rule_exprs.rules(load_yaml(ALERTS))
             for m in METRIC.findall(e)}
    for where, metric in sorted(used):
        p.check(metric in exported, f"{where}: {metric} is not exported by src/")


def expr_scripts(p):
    """dashboard_exprs.py and rule_exprs.py print one substituted expr per line."""
    for script, minimum in (("dashboard_exprs.py", 20), ("rule_exprs.py", 10)):
        result = subprocess.run([sys.executable, str(HERE / script)],
                                capture_output=True, text=True, check=False)
        if not p.check(result.returncode == 0, f"{script}: {result.stderr.strip()}"):
            continue
        lines = result.stdout.splitlines()
        p.check(len(lines) >= minimum, f"{script}: only {len(lines)} expressions")
        for line in lines:
            p.check(line.strip() and "$" not in line, f"{script}: bad line {line!r}")


# ------------------------------------------------------------------- config


def config_examples(p):
    """config.example.yml and the ConfigMap follow the exporter's file format."""
    docs = {
        "deploy/config.example.yml": load_yaml(DEPLOY / "config.example.yml"),
        "ConfigMap config.yml": yaml.safe_load(
            load_yaml(K8S / "configmap.yaml")["data"]["config.yml"]),
    }
    for where, doc in docs.items():
        p.check(set(doc) == {"policy_tests"}, f"{where}: keys other than policy_tests")
        tests = doc.get("policy_tests") or []
        p.check(tests, f"{where}: no policy tests")
        for i, test in enumerate(tests):
            p.check(set(test) <= {"account_id", "id", "name"},
                    f"{where}: policy_tests[{i}] has unknown keys")
            p.check(re.fullmatch(r"[0-9a-fA-F]{32}", str(test.get("account_id", ""))),
                    f"{where}: policy_tests[{i}].account_id is not 32 hex characters")
            p.check(0 < len(str(test.get("id", ""))) <= 64,
                    f"{where}: policy_tests[{i}].id is empty or longer than 64")


CHECKS = {
    "dockerignore": dockerignore,
    "dockerfile": dockerfile,
    "compose": compose,
    "kustomization": kustomization,
    "deployment": deployment,
    "servicemonitor": servicemonitor,
    "prometheusrule": prometheusrule,
    "alert-style": alert_style,
    "alert-tests-cover-every-alert": alert_tests_cover_every_alert,
    "systemd-unit": systemd_unit,
    "dashboard": dashboard,
    "dashboard-exprs-parse": dashboard_exprs_parse,
    "metric-names": metric_names,
    "expr-scripts": expr_scripts,
    "config-examples": config_examples,
}


def main():
    if len(sys.argv) == 2 and sys.argv[1] == "compose-real-token-variant":
        compose_real_token_variant()
        return 0
    if len(sys.argv) != 2 or sys.argv[1] not in CHECKS:
        print(f"usage: {sys.argv[0]} {{{','.join(CHECKS)}}}", file=sys.stderr)
        return 2
    problems = Problems()
    try:
        CHECKS[sys.argv[1]](problems)
    except (KeyError, TypeError, ValueError, OSError, yaml.YAMLError) as error:
        problems.append(f"{type(error).__name__}: {error}")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
