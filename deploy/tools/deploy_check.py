#!/usr/bin/env python3
"""Offline checks of moe-serve's deployment files (run by scripts/check_deploy.sh).

Subcommands:
  render DIR        print the manifests of a kustomization (the subset of Kustomize that
                    deploy/k8s uses: resources, patches (strategic merge), namespace, images)
  sync-rules        rewrite deploy/k8s/base/prometheusrule.yaml from deploy/prometheus
  check             every check below; exit 1 on the first failing group

Why a renderer of our own: kustomize is not packaged for Debian 12 or on PyPI, and CI runs
without network beyond those. The renderer refuses any kustomization field it does not
implement, and when `kubectl kustomize` (or `kustomize`) is on PATH the check renders every
kustomization with it too and requires the same objects.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu", "examples/model-hostpath"]
ALERTS = DEPLOY / "prometheus" / "moe-serve-alerts.yaml"
PROMETHEUS_RULE = K8S / "base" / "prometheusrule.yaml"
ADAPTER_CONFIG = DEPLOY / "prometheus-adapter" / "config.yaml"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
DASHBOARD = DEPLOY / "grafana" / "moe-serve.json"
SCHEMAS = DEPLOY / "tools" / "schemas"
# Oldest Kubernetes the manifests are meant for (native gRPC probes are GA from 1.27;
# PodDisruptionBudget.unhealthyPodEvictionPolicy from 1.31, beta and on by default before),
# and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.29.0", None]

# Labels every scraped series gets besides the exporter's own (Prometheus / the Operator).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint", "node"}
NON_MOESERVE_METRICS = {"up"}  # synthetic series the alerts and dashboard also read


class CheckError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# YAML helpers

def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def dump(docs: list[dict]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=True, default_flow_style=False)


def key_of(doc: dict) -> tuple[str, str]:
    return (doc.get("kind", ""), doc.get("metadata", {}).get("name", ""))


# ---------------------------------------------------------------------------------------------
# The Kustomize subset

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "APIService", "PriorityClass",
                  "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
# patchMergeKey of the Kubernetes API types for the lists we patch; other lists are replaced.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name",
              "volumes": "name", "volumeMounts": "mountPath", "env": "name",
              "imagePullSecrets": "name", "topologySpreadConstraints": "topologyKey"}


def _merge_key(field: str, items: list) -> str | None:
    if field == "ports":  # containerPort in a container, port in a Service
        if all(isinstance(i, dict) and "containerPort" in i for i in items):
            return "containerPort"
        if all(isinstance(i, dict) and "port" in i for i in items):
            return "port"
        return None
    return MERGE_KEYS.get(field)


def strategic_merge(target, patch, field: str = ""):
    """Kubernetes strategic merge patch for maps and keyed lists; null deletes a key."""
    if isinstance(target, dict) and isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: v for k, v in patch.items() if k != "$patch"}
        out = dict(target)
        for k, v in patch.items():
            if k.startswith("$"):
                raise CheckError(f"unsupported strategic-merge directive {k}")
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = _strip_nulls(v)
        return out
    if isinstance(target, list) and isinstance(patch, list):
        key = _merge_key(field, target + patch)
        if key is None:
            return _strip_nulls(patch)
        out = list(target)
        for item in patch:
            idx = next((i for i, t in enumerate(out) if t.get(key) == item.get(key)), None)
            if item.get("$patch") == "delete":
                if idx is not None:
                    out.pop(idx)
            elif idx is None:
                out.append(_strip_nulls(item))
            else:
                out[idx] = strategic_merge(out[idx], item, field)
        return out
    return _strip_nulls(patch)


def _strip_nulls(v):
    if isinstance(v, dict):
        return {k: _strip_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_strip_nulls(x) for x in v]
    return v


def _set_images(node, images: list[dict]):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                for c in v:
                    ref = c.get("image", "")
                    name = re.split(r"[@]", ref)[0]
                    name = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
                    for img in images:
                        if img["name"] == name:
                            new = img.get("newName", name)
                            if "digest" in img:
                                new += "@" + img["digest"]
                            elif "newTag" in img:
                                new += ":" + str(img["newTag"])
                            elif ref != name:
                                new += ref[len(name):]
                            c["image"] = new
            else:
                _set_images(v, images)
    elif isinstance(node, list):
        for x in node:
            _set_images(x, images)


def render(directory: Path) -> list[dict]:
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise CheckError(f"{directory}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise CheckError(f"{kfile}: fields {sorted(unknown)} are not implemented by "
                         "deploy/tools/deploy_check.py's renderer: implement them there")
    docs: list[dict] = []
    for res in k.get("resources", []):
        p = (directory / res).resolve()
        docs += render(p) if p.is_dir() else load_docs(p)
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise CheckError(f"{kfile}: only `patches: - path: FILE` (strategic merge) is supported")
        for pdoc in load_docs(directory / patch["path"]):
            matches = [i for i, d in enumerate(docs) if key_of(d) == key_of(pdoc)]
            if len(matches) != 1:
                raise CheckError(f"{directory / patch['path']}: patch target {key_of(pdoc)} "
                                 f"matches {len(matches)} resources")
            i = matches[0]
            if pdoc.get("$patch") == "delete":
                docs.pop(i)
            else:
                docs[i] = strategic_merge(docs[i], pdoc)
    if "images" in k:
        for d in docs:
            _set_images(d, k["images"])
    if "namespace" in k:
        for d in docs:
            if d.get("kind") not in CLUSTER_SCOPED:
                d.setdefault("metadata", {})["namespace"] = k["namespace"]
    return docs


def kustomize_cli() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def compare_with_kustomize(name: str, ours: list[dict], cli: list[str]) -> None:
    out = subprocess.run(cli + [str(K8S / name)], capture_output=True, text=True)
    if out.returncode != 0:
        raise CheckError(f"{' '.join(cli)} {name} failed:\n{out.stderr}")
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    a = dump(sorted(ours, key=key_of))
    b = dump(sorted(theirs, key=key_of))
    if a != b:
        diff = "\n".join(difflib.unified_diff(b.splitlines(), a.splitlines(), "kustomize",
                                              "deploy_check.py", lineterm=""))
        raise CheckError(f"{name}: our rendering differs from {' '.join(cli)}:\n{diff}")


# ---------------------------------------------------------------------------------------------
# Schemas

def validate_schemas(name: str, docs: list[dict]) -> None:
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate import utils as kv

    crd = {"ServiceMonitor": "servicemonitor.json", "PrometheusRule": "prometheusrule.json"}
    for d in docs:
        where = f"{name}: {d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if d.get("kind") in crd:
            schema = json.loads((SCHEMAS / crd[d["kind"]]).read_text())
            try:
                jsonschema.Draft7Validator(schema).validate(d)
            except jsonschema.ValidationError as e:
                raise CheckError(f"{where}: {e.message} at {'/'.join(map(str, e.absolute_path))}")
            continue
        for version in K8S_VERSIONS:
            version = version or kv.latest_version()
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kv.ValidationError as e:
                raise CheckError(f"{where} (Kubernetes {version}): {e.message} at "
                                 f"{'/'.join(map(str, e.absolute_path))}")
            except kv.SchemaNotFoundError as e:
                raise CheckError(f"{where}: {e.message}")


def validator_self_test() -> None:
    """The validators must reject what they exist to reject (a typo, an unknown field)."""
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate import utils as kv

    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 1, "appProtocl": "http"}]}}
    try:
        kubernetes_validate.validate(bad, kv.latest_version(), strict=True)
    except kv.ValidationError:
        pass
    else:
        raise CheckError("self-test: kubernetes-validate accepted an unknown field")
    for kind, fname in (("ServiceMonitor", "servicemonitor.json"),
                        ("PrometheusRule", "prometheusrule.json")):
        schema = json.loads((SCHEMAS / fname).read_text())
        bad = {"apiVersion": "monitoring.coreos.com/v1", "kind": kind, "metadata": {"name": "x"},
               "spec": {"selectr": {}}}
        if jsonschema.Draft7Validator(schema).is_valid(bad):
            raise CheckError(f"self-test: the {kind} schema accepted an unknown field")


# ---------------------------------------------------------------------------------------------
# What the manifests must say (beyond the schemas)

def parse_duration(s: str) -> float:
    total, pos = 0.0, 0
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|h|m|s)", s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise CheckError(f"cannot parse duration {s!r}")
    return total


def server_flags() -> set[str] | None:
    main = ROOT / "server" / "main.cc"
    if not main.is_file():
        return None
    return set(re.findall(r"ABSL_FLAG\(\s*[\w:<>]+\s*,\s*(\w+)\s*,", main.read_text()))


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def one(docs, kind):
    found = by_kind(docs, kind)
    if len(found) != 1:
        raise CheckError(f"expected one {kind}, found {len(found)}")
    return found[0]


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def policy(name: str, docs: list[dict]) -> None:
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    plabels = pod["metadata"]["labels"]
    cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "moe-serve-config")
    env = cm["data"]
    c = next(x for x in spec["containers"] if x["name"] == "moe-serve")
    where = f"{name}: Deployment/{dep['metadata']['name']}"

    def need(cond, msg):
        if not cond:
            raise CheckError(f"{where}: {msg}")

    need("replicas" not in dep["spec"], "set no replicas: the HPA owns the count")
    need(labels_match(dep["spec"]["selector"]["matchLabels"], plabels), "selector != pod labels")
    # Flags: every MOE_ variable names a moe-serve flag.
    flags = server_flags()
    for k in env:
        need(k.startswith("MOE_") or k.startswith("CUDA_"), f"ConfigMap key {k} is no MOE_ flag")
        if flags is not None and k.startswith("MOE_"):
            need(k[4:].lower() in flags, f"{k}: moe-serve has no flag --{k[4:].lower()} "
                                         "(server/main.cc)")
    need({"configMapRef": {"name": "moe-serve-config"}} in c.get("envFrom", []),
         "the container must take its flags from the ConfigMap")
    # Ports and probes.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    need(ports.get("grpc") == int(env["MOE_PORT"]), "grpc containerPort != MOE_PORT")
    need(ports.get("metrics") == int(env["MOE_METRICS_PORT"]), "metrics containerPort != MOE_METRICS_PORT")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        need(probe in c and "grpc" in c[probe], f"{probe} must be a native gRPC probe")
        need(c[probe]["grpc"]["port"] == ports["grpc"], f"{probe} must probe the gRPC port")
    # Security.
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    need(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) > 0, "pod must run as non-root")
    need(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    need(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    need(csc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities must drop ALL")
    need("memory" in c["resources"].get("limits", {}), "set a memory limit")
    need("cpu" in c["resources"].get("requests", {}), "set a CPU request")
    # Drain: grace > preStop + MOE_DRAIN_TIMEOUT + 10 s cancellation + 1 s shutdown.
    drain = parse_duration(env["MOE_DRAIN_TIMEOUT"])
    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_s = 0.0
    if "exec" in pre:
        cmd = pre["exec"]["command"]
        need(cmd[0] == "sleep" and len(cmd) == 2, "preStop: only `sleep N` is understood here")
        pre_s = float(cmd[1])
    elif "sleep" in pre:
        pre_s = float(pre["sleep"]["seconds"])
    grace = spec.get("terminationGracePeriodSeconds", 30)
    need(grace > pre_s + drain + 11,
         f"terminationGracePeriodSeconds {grace} <= preStop {pre_s:g} + drain {drain:g} + 11 s")
    live = c["livenessProbe"]
    need(live.get("periodSeconds", 10) * live.get("failureThreshold", 3) >= pre_s + drain,
         "liveness would kill a draining pod (health NOT_SERVING) before its drain ends")
    # Volumes mounted exist.
    vols = {v["name"] for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        need(m["name"] in vols, f"volumeMount {m['name']} has no volume")
    if env.get("MOE_MODEL", "").startswith("/models"):
        need(any(m["mountPath"] == "/models" for m in c["volumeMounts"]), "MOE_MODEL outside a mount")
    # Backend / GPU per overlay.
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    if name.endswith("gpu") or "hostpath" in name:
        need(env["MOE_BACKEND"] == "cuda", "the GPU overlay must set MOE_BACKEND=cuda")
        need(gpus is not None and int(gpus) >= 1, "the GPU overlay must request nvidia.com/gpu")
    elif name.endswith("cpu"):
        need(env["MOE_BACKEND"] == "cpu", "the CPU overlay must set MOE_BACKEND=cpu")
        need(gpus is None, "the CPU overlay must not request a GPU")
    # Service, PDB, HPA, ServiceMonitor agree with the pods.
    svc = next(d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "moe-serve")
    need(labels_match(svc["spec"]["selector"], plabels), "Service selector misses the pods")
    for p in svc["spec"]["ports"]:
        need(p.get("appProtocol"), f"Service port {p['name']} has no appProtocol")
        need(p["targetPort"] in ports, f"Service targetPort {p['targetPort']} is no container port")
    pdb = one(docs, "PodDisruptionBudget")
    need(labels_match(pdb["spec"]["selector"]["matchLabels"], plabels), "PDB selector misses the pods")
    hpa = one(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    need(ref["kind"] == "Deployment" and ref["name"] == dep["metadata"]["name"], "HPA targets another workload")
    need(hpa["spec"].get("minReplicas", 1) >= 2, "HPA minReplicas < 2: the PDB would allow an outage")
    sm = one(docs, "ServiceMonitor")
    need(labels_match(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]),
         "ServiceMonitor does not select the moe-serve Service")
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        need(ep["port"] in svc_ports, f"ServiceMonitor port {ep['port']} not on the Service")
    scraped = [d for d in by_kind(docs, "Service")
               if labels_match(sm["spec"]["selector"]["matchLabels"], d["metadata"].get("labels", {}))]
    need(len(scraped) == 1, "the ServiceMonitor must select exactly one Service (no double scrape)")


# ---------------------------------------------------------------------------------------------
# Prometheus: the PrometheusRule mirrors the rules file; adapter config

def prometheus_rule_doc() -> dict:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "moe-serve",
                         "labels": {"app.kubernetes.io/name": "moe-serve",
                                    "app.kubernetes.io/component": "alerting"}},
            "spec": {"groups": groups}}


PROMETHEUS_RULE_HEADER = """\
# GENERATED from deploy/prometheus/moe-serve-alerts.yaml by
# `python3 deploy/tools/deploy_check.py sync-rules`: edit the rules file, not this one
# (scripts/check_deploy.sh fails when they differ). If your Prometheus selects rules by label
# (kube-prometheus-stack: release=<name>), add that label in your overlay.
"""


class _ReadableDumper(yaml.SafeDumper):
    """Block literals for multi-line strings, indented sequences (yamllint's default style)."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


_ReadableDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def sync_rules() -> None:
    text = PROMETHEUS_RULE_HEADER + yaml.dump(prometheus_rule_doc(), Dumper=_ReadableDumper,
                                              sort_keys=False, width=1000, allow_unicode=True)
    PROMETHEUS_RULE.write_text(text)
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")


def check_prometheus_rule() -> None:
    have = load_docs(PROMETHEUS_RULE)
    if have != [prometheus_rule_doc()]:
        raise CheckError(f"{PROMETHEUS_RULE.relative_to(ROOT)} differs from "
                         f"{ALERTS.relative_to(ROOT)}: run `python3 deploy/tools/deploy_check.py "
                         "sync-rules`")


def adapter_rules() -> list[dict]:
    rules = yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]
    helm = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    if rules != helm:
        raise CheckError("prometheus-adapter: values.yaml rules.custom differs from config.yaml rules")
    return rules


def adapter_metric_names(rules) -> set[str]:
    names = set()
    for r in rules:
        series = re.match(r"\s*([a-zA-Z_:][\w:]*)", r["seriesQuery"]).group(1)
        m = re.search(r["name"]["matches"], series)
        if not m:
            raise CheckError(f"adapter: name.matches does not match {series}")
        names.add(m.expand(r["name"]["as"].replace("${", "\\g<").replace("}", ">"))
                  if r["name"].get("as") else series)
        ov = r["resources"]["overrides"]
        if ov.get("pod", {}).get("resource") != "pod" or \
                ov.get("namespace", {}).get("resource") != "namespace":
            raise CheckError("adapter: the rule must map the pod and namespace labels")
    return names


def check_hpa_metric(docs, adapter_names) -> None:
    hpa = one(docs, "HorizontalPodAutoscaler")
    for m in hpa["spec"]["metrics"]:
        if m["type"] == "Pods" and m["pods"]["metric"]["name"] not in adapter_names:
            raise CheckError(f"HPA metric {m['pods']['metric']['name']} is served by no adapter "
                             f"rule (have {sorted(adapter_names)})")


def adapter_query(rule, pods=("moe-serve-a", "moe-serve-b")) -> str:
    """The query the adapter sends for `kubectl get --raw .../pods/*/METRIC`."""
    series = re.match(r"\s*([a-zA-Z_:][\w:]*)", rule["seriesQuery"]).group(1)
    q = rule["metricsQuery"]
    q = q.replace("<<.Series>>", series)
    q = q.replace("<<.LabelMatchers>>", f'namespace="moe-serve",pod=~"{"|".join(pods)}"')
    q = q.replace("<<.GroupBy>>", "pod")
    if "<<" in q:
        raise CheckError(f"adapter: unknown template field in {rule['metricsQuery']}")
    return q


# ---------------------------------------------------------------------------------------------
# Grafana

GRAFANA_BUILTIN_INTERVALS = ("$__rate_interval", "$__interval", "$__range")


def dashboard_exprs(dash) -> list[tuple[str, str]]:
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p['id']} '{p.get('title')}' {t['refId']}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    return out


def check_dashboard() -> tuple[dict, list[tuple[str, str]]]:
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        raise CheckError(f"{DASHBOARD.relative_to(ROOT)}: invalid JSON: {e}")
    for k in ("uid", "title", "schemaVersion", "panels", "templating"):
        if k not in dash:
            raise CheckError(f"dashboard: no {k}")
    ids, variables = [], {v["name"] for v in dash["templating"]["list"]}
    if "datasource" not in variables:
        raise CheckError("dashboard: needs a datasource variable (no hard-wired data source)")

    def walk(panels):
        for p in panels:
            ids.append(p.get("id"))
            for k in ("type", "title", "gridPos"):
                if k not in p:
                    raise CheckError(f"dashboard panel {p.get('id')}: no {k}")
            if p["type"] != "row":
                ds = p.get("datasource", {})
                if ds.get("uid") != "${datasource}":
                    raise CheckError(f"dashboard panel {p['id']}: datasource must be ${{datasource}}")
                if not p.get("targets"):
                    raise CheckError(f"dashboard panel {p['id']}: no query")
            walk(p.get("panels", []))

    walk(dash["panels"])
    if len(ids) != len(set(ids)) or None in ids:
        raise CheckError("dashboard: panel ids must be present and unique")
    exprs = dashboard_exprs(dash)
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            exprs.append((f"variable {v['name']}", v["query"]["query"] if isinstance(v["query"], dict)
                          else v["query"]))
    for where, e in exprs:
        for var in re.findall(r"\$\{?(\w+)", e):
            if not var.startswith("__") and var not in variables:
                raise CheckError(f"dashboard {where}: undefined variable ${var}")
    return dash, exprs


def grafana_to_promql(expr: str) -> str | None:
    if expr.lstrip().startswith("label_values("):
        m = re.match(r"\s*label_values\((.*),\s*\w+\)\s*$", expr)
        expr = m.group(1) if m else expr
    for v in GRAFANA_BUILTIN_INTERVALS:
        expr = expr.replace(v, "5m")
    return re.sub(r"\$\{?\w+\}?", "x", expr)


# ---------------------------------------------------------------------------------------------
# Exported metric names

def exported_metrics(source: Path) -> dict[str, set[str]]:
    """name -> label names, from METRICS.md tables or from a /metrics scrape (text format)."""
    text = source.read_text()
    out: dict[str, set[str]] = {}
    if "# TYPE " in text:
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*?)\})?\s", line)
            if m:
                labels = set(re.findall(r"(\w+)=\"", m.group(2) or ""))
                out.setdefault(m.group(1), set()).update(labels)
        return out
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or cells[0] in ("name", "") or \
                set(cells[0]) <= set("-: "):
            continue
        names = [n.strip(" `") for n in cells[0].split(",")]
        mtype = cells[1].split()[0].strip(",") if cells[1] else ""
        labels, in_values = {"model"}, False
        for piece in cells[2].split(","):
            piece = piece.strip()
            if not piece:
                continue
            if "=" in piece:
                labels.add(piece.split("=")[0].strip())
                in_values = True
            elif not in_values:
                labels.add(piece)
        for n in names:
            full = "moeserve_" + n
            if mtype == "histogram":
                out[full + "_bucket"] = labels | {"le"}
                out[full + "_sum"] = set(labels)
                out[full + "_count"] = set(labels)
            else:
                out[full] = set(labels)
    for n in re.findall(r"exported as\s+`(\w+)`", text):
        out["moeserve_" + n] = {"model"}
    if not out:
        raise CheckError(f"{source}: no metric names found")
    return out


def check_metric_names(exported: dict[str, set[str]], sources: list[tuple[str, str]]) -> int:
    problems, n = [], 0
    for where, expr in sources:
        names = set(re.findall(r"\b(moeserve_\w+)", expr))
        n += len(names)
        for name in names:
            if name not in exported:
                problems.append(f"{where}: {name} is not exported")
        allowed = set(TARGET_LABELS)
        for name in names:
            allowed |= exported.get(name, set())
        # Matchers inside {...} of each moeserve selector.
        for m in re.finditer(r"\b(moeserve_\w+)\{([^}]*)\}", expr):
            mine = exported.get(m.group(1), set()) | TARGET_LABELS
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(2)):
                if label not in mine:
                    problems.append(f"{where}: {m.group(1)} has no label {label}")
        # Grouping / matching clauses and legend templates.
        for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
            for label in [x.strip() for x in m.group(1).split(",") if x.strip()]:
                if names and label not in allowed:
                    problems.append(f"{where}: no metric of the expression has label {label}")
    if problems:
        raise CheckError("metric names/labels not in the exported set:\n  " + "\n  ".join(problems))
    return n


# ---------------------------------------------------------------------------------------------
# promtool on everything that is PromQL but not a rule file: dashboard and adapter queries

def promtool_queries(queries: list[tuple[str, str]], adapter_rule: dict, workdir: Path) -> None:
    rules = []
    for i, (where, q) in enumerate(queries):
        rules.append({"record": f"check:query_{i}", "expr": q})
    aq = adapter_query(adapter_rule)
    rules.append({"record": "check:adapter_query", "expr": aq})
    (workdir / "queries.rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard-and-adapter", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(workdir / "queries.rules.yaml")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        index = "\n".join(f"  query_{i}: {w}: {q}" for i, (w, q) in enumerate(queries))
        raise CheckError(f"promtool rejects a dashboard/adapter query:\n{r.stdout}{r.stderr}\n{index}")
    # What the HPA would read: the adapter's query over two pods, one with a growing queue.
    test = {
        "rule_files": ["queries.rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "15s",
            "input_series": [
                {"series": 'moeserve_num_requests_waiting{namespace="moe-serve",pod="moe-serve-a",'
                           'model="m",job="moe-serve"}', "values": "6x20"},
                {"series": 'moeserve_num_requests_waiting{namespace="moe-serve",pod="moe-serve-b",'
                           'model="m",job="moe-serve"}', "values": "0x20"},
                {"series": 'moeserve_num_requests_waiting{namespace="other",pod="moe-serve-a",'
                           'model="m",job="moe-serve"}', "values": "100x20"},
            ],
            "promql_expr_test": [{
                "expr": "check:adapter_query", "eval_time": "4m",
                "exp_samples": [{"labels": 'check:adapter_query{pod="moe-serve-a"}', "value": 6},
                                {"labels": 'check:adapter_query{pod="moe-serve-b"}', "value": 0}],
            }],
        }],
    }
    (workdir / "adapter.test.yaml").write_text(yaml.safe_dump(test))
    r = subprocess.run(["promtool", "test", "rules", str(workdir / "adapter.test.yaml")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise CheckError(f"the adapter query does not give the per-pod waiting count:\n{r.stdout}{r.stderr}")


# ---------------------------------------------------------------------------------------------

def check_dockerfile(docs: list[dict]) -> str:
    """The image agrees with the project (demo model recipe) and with the manifests."""
    text = (ROOT / "Dockerfile").read_text()
    demo = (ROOT / "scripts" / "serve_demo.sh").read_text()
    want = re.search(r"--tokenizer=(\S+)", demo)
    have = re.search(r"--tokenizer=(\S+?);?\s", text)
    if not have or not (ROOT / have.group(1)).is_file():
        raise CheckError(f"Dockerfile: demo model tokenizer {have and have.group(1)} does not exist")
    if want and want.group(1) != have.group(1):
        raise CheckError(f"Dockerfile: demo tokenizer {have.group(1)} != scripts/serve_demo.sh's {want.group(1)}")
    user = re.findall(r"^USER\s+(\d+)", text, flags=re.M)
    dep = one(docs, "Deployment")["spec"]["template"]["spec"]
    if not user or int(user[-1]) != dep["securityContext"]["runAsUser"]:
        raise CheckError(f"Dockerfile USER {user} != the Deployment's runAsUser")
    exposed = set(re.findall(r"^EXPOSE\s+(.*)$", text, flags=re.M)[-1].split())
    env = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    if exposed != {env["MOE_PORT"], env["MOE_METRICS_PORT"]}:
        raise CheckError(f"Dockerfile EXPOSE {sorted(exposed)} != MOE_PORT/MOE_METRICS_PORT")
    return f"demo tokenizer {have.group(1)}, USER {user[-1]}, EXPOSE {' '.join(sorted(exposed))}"


def alert_exprs() -> list[tuple[str, str]]:
    out = []
    for g in yaml.safe_load(ALERTS.read_text())["groups"]:
        for r in g["rules"]:
            out.append((f"alert {r.get('alert') or r.get('record')}", r["expr"]))
    return out


def check_runbook() -> None:
    readme = (DEPLOY / "README.md").read_text()
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+\s+(.*)$", readme, flags=re.M)}
    for g in yaml.safe_load(ALERTS.read_text())["groups"]:
        for r in g["rules"]:
            if "alert" not in r:
                continue
            link = r.get("annotations", {}).get("runbook", "")
            if not link.startswith("deploy/README.md#") or link.split("#")[1] not in anchors:
                raise CheckError(f"alert {r['alert']}: runbook {link!r} is no heading of deploy/README.md")
            if r["alert"].lower() != link.split("#")[1]:
                raise CheckError(f"alert {r['alert']}: runbook anchor should be #{r['alert'].lower()}")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in ("render", "sync-rules", "check"):
        print(__doc__)
        return 2
    if argv[1] == "render":
        print(dump(render(Path(argv[2]).resolve())), end="")
        return 0
    if argv[1] == "sync-rules":
        sync_rules()
        return 0

    metrics_source = Path(os.environ.get("MOE_EXPORTED_METRICS",
                                         ROOT.parent / "shared" / "METRICS.md"))
    state: dict = {}
    cli = kustomize_cli()

    def render_all():
        state["rendered"] = {k: render(K8S / k) for k in KUSTOMIZATIONS}
        counts = ", ".join(f"{k}: {len(v)}" for k, v in state["rendered"].items())
        if cli:
            for k, docs in state["rendered"].items():
                compare_with_kustomize(k, docs, cli)
            return f"{counts} objects; identical to `{' '.join(cli)}`"
        return f"{counts} objects; no kustomize/kubectl on PATH, so not cross-checked"

    def schemas():
        validator_self_test()
        import kubernetes_validate
        from kubernetes_validate import utils as kv
        for k, docs in state["rendered"].items():
            validate_schemas(k, docs)
        vers = ", ".join(v or kv.latest_version() for v in K8S_VERSIONS)
        return (f"kubernetes-validate {kubernetes_validate.__version__} strict, Kubernetes {vers}; "
                "ServiceMonitor/PrometheusRule against deploy/tools/schemas")

    def policies():
        for k, docs in state["rendered"].items():
            if k != "base":
                policy(k, docs)
        flags = "flags from server/main.cc" if server_flags() is not None else \
            "server/main.cc absent: MOE_ names unchecked"
        return f"probes, security, drain budget, selectors, GPU/CPU overlays; {flags}"

    def prom_rule():
        check_prometheus_rule()
        return "PrometheusRule == deploy/prometheus rules"

    def adapter():
        state["adapter"] = adapter_rules()
        names = adapter_metric_names(state["adapter"])
        for k, docs in state["rendered"].items():
            check_hpa_metric(docs, names)
        return f"config.yaml == values.yaml; HPA metric {sorted(names)} served"

    def dashboard():
        state["dash"], state["dash_exprs"] = check_dashboard()
        return f"{len(state['dash']['panels'])} panels, {len(state['dash_exprs'])} queries"

    def queries():
        with tempfile.TemporaryDirectory() as d:
            qs = [(w, grafana_to_promql(e)) for w, e in state["dash_exprs"]]
            promtool_queries(qs, state["adapter"][0], Path(d))
        return "dashboard + adapter queries parse; adapter query unit-tested"

    def names():
        if not metrics_source.is_file():
            raise CheckError(f"{metrics_source}: not found (set MOE_EXPORTED_METRICS to METRICS.md "
                             "or to a saved /metrics scrape)")
        exported = exported_metrics(metrics_source)
        sources = alert_exprs() + state["dash_exprs"]
        sources += [(f"adapter {k}", r[k]) for r in state["adapter"] for k in ("seriesQuery", "metricsQuery")]
        for k, docs in state["rendered"].items():
            for m in one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]:
                sources.append((f"{k} HPA", m["pods"]["metric"]["name"]))
        n = check_metric_names(exported, sources)
        return f"{n} metric references, labels included, against {len(exported)} names from {metrics_source}"

    def dockerfile():
        return check_dockerfile(state["rendered"]["overlays/gpu"])

    def runbook():
        check_runbook()
        return "every alert links its deploy/README.md section"

    steps = [("kustomize render", render_all), ("kubernetes schemas", schemas),
             ("manifest policy", policies), ("PrometheusRule sync", prom_rule),
             ("prometheus-adapter + HPA", adapter), ("grafana dashboard", dashboard),
             ("promtool queries", queries), ("exported metric names", names),
             ("Dockerfile vs project", dockerfile), ("runbook links", runbook)]
    failed = 0
    for title, fn in steps:
        try:
            print(f"  ok    {title}: {fn()}")
        except CheckError as e:
            failed += 1
            print(f"  FAIL  {title}: {e}")
            if title in ("kustomize render",):
                break
        except (KeyError, StopIteration, TypeError) as e:
            failed += 1
            print(f"  FAIL  {title}: missing or malformed field ({type(e).__name__}: {e})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
