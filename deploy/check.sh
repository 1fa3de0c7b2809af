#!/usr/bin/env bash
# Checks the deployment artefacts in deploy/ with each ecosystem's own tool:
#
#   systemd     systemd-analyze verify, and the exposure rating of
#               systemd-analyze security --offline=true (must be <= 2.0)
#   Kubernetes  yamllint, kubernetes-validate --strict (latest bundled schemas and 1.30),
#               and cross-references between the manifests; the same for the gateway
#               variant (deploy/kubernetes/gateway/)
#   Prometheus  yamllint, promtool check rules, promtool test rules
#   Grafana     python3 -m json.tool, and the dashboard's basic structure
#
# That the rules and the dashboard only use metrics the daemon exports is checked by
# `cargo test --test deploy_metrics` (tests/deploy_metrics.rs), which .ci/run runs with the
# other tests.
#
# Usage: deploy/check.sh   (from anywhere; it works on the repository it lives in)
# Missing tools are installed: promtool and systemd-analyze with apt-get (needs root, as in
# CI), yamllint and kubernetes-validate with pip into target/deploy-tools/python (a private
# directory, so that Debian's "externally managed" system Python is left alone).
# Set PROMTOOL, SYSTEMD_ANALYZE to use other binaries.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

unit=deploy/systemd/webio-router.service
k8s=deploy/kubernetes
rules=deploy/prometheus/alerts.yml
rule_tests=deploy/prometheus/alerts.test.yml
dashboard=deploy/grafana/webio-router.json
yamllint_config=deploy/.yamllint.yaml
max_exposure=2.0
# The oldest Kubernetes the manifests support (preStop "sleep" actions are GA-track from 1.30).
min_kubernetes=1.30.0

export SYSTEMD_COLORS=0 SYSTEMD_PAGER=cat

step() { printf '\n==> %s\n' "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
fail() { printf '    FAILED: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---------------------------------------------------------------------------- tools

apt_updated=
apt_install() {
    [[ $(id -u) -eq 0 ]] || fail "$* missing and not root: install it (apt-get install $*)"
    if [[ -z $apt_updated ]]; then
        apt-get -o DPkg::Lock::Timeout=300 update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "$@" >/dev/null
}

step "tools"
PROMTOOL=${PROMTOOL:-promtool}
if ! command -v "$PROMTOOL" >/dev/null; then
    echo "    installing promtool (Debian package prometheus)"
    apt_install prometheus
    PROMTOOL=promtool
fi
SYSTEMD_ANALYZE=${SYSTEMD_ANALYZE:-systemd-analyze}
if ! command -v "$SYSTEMD_ANALYZE" >/dev/null; then
    echo "    installing systemd-analyze (Debian package systemd)"
    apt_install systemd
    SYSTEMD_ANALYZE=systemd-analyze
fi

# yamllint and kubernetes-validate: the ones on PATH, else a private pip --target install
# run as python3 -m ... (pip's --target is exempt from PEP 668, unlike a plain install).
pydir=$repo/target/deploy-tools/python
py_python() { PYTHONPATH="$pydir${PYTHONPATH:+:$PYTHONPATH}" python3 "$@"; }
py_tool() { py_python -m "$@"; }
if command -v yamllint >/dev/null && command -v kubernetes-validate >/dev/null \
    && python3 -c 'import yaml' 2>/dev/null; then
    YAMLLINT=(yamllint)
    KUBERNETES_VALIDATE=(kubernetes-validate)
    PYTHON=(python3)
else
    if ! PYTHONPATH=$pydir python3 -c 'import yamllint, kubernetes_validate, yaml' 2>/dev/null; then
        echo "    installing yamllint and kubernetes-validate into $pydir"
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
            --no-warn-script-location --target "$pydir" --upgrade \
            'yamllint>=1.29' 'kubernetes-validate>=1.30'
    fi
    YAMLLINT=(py_tool yamllint)
    KUBERNETES_VALIDATE=(py_tool kubernetes_validate)
    PYTHON=(py_python)
fi
echo "    promtool:            $("$PROMTOOL" --version 2>&1 | head -n1)"
echo "    systemd-analyze:     $("$SYSTEMD_ANALYZE" --version | head -n1)"
echo "    yamllint:            $("${YAMLLINT[@]}" --version)"
echo "    kubernetes-validate: $("${KUBERNETES_VALIDATE[@]}" --version)"

# ---------------------------------------------------------------------------- systemd

step "systemd: systemd-analyze verify $unit"
# verify insists that every Exec*= program exists and is executable, and the daemon is not
# installed on a CI machine (nor, in a minimal container, /bin/kill). Verify a copy, under the
# same unit name, in which each program missing here is replaced by a stub at
# <tmp>/stub/<original path>; everything else is verified exactly as written.
mkdir -p "$work/unit"
cp "$unit" "$work/unit/"
copy=$work/unit/${unit##*/}
while read -r prog; do
    [[ -x $prog ]] && continue
    stub=$work/stub$prog
    mkdir -p "${stub%/*}"
    printf '#!/bin/sh\nexit 0\n' >"$stub"
    chmod 0755 "$stub"
    sed -i "s#^\(Exec[A-Za-z]*=[-@:+!]*\)${prog//./\\.}\([[:space:]]\|\$\)#\1${stub}\2#" "$copy"
    echo "    $prog does not exist here: verifying with a stub in its place"
done < <(sed -nE 's/^Exec[A-Za-z]*=[-@:+!]*(\/[^[:space:]]+).*/\1/p' "$unit" | sort -u)
# verify exits 0 on unknown keys and unparsable values (it only logs them): any message
# about our unit counts as a failure. Messages about other units (a host's own units
# pulled in as dependencies) are shown but not counted.
set +e
verify_out=$("$SYSTEMD_ANALYZE" verify --man=no "$copy" 2>&1)
verify_rc=$?
set -e
[[ -n $verify_out ]] && printf '%s\n' "$verify_out" | sed 's/^/    | /'
[[ $verify_rc -eq 0 ]] || fail "systemd-analyze verify exited $verify_rc"
if grep -q -e "$work" -e 'webio-router' <<<"$verify_out"; then
    fail "systemd-analyze verify reported problems in $unit"
fi
ok "unit verified"

step "systemd: systemd-analyze security --offline=true $unit (exposure <= $max_exposure)"
security_out=$("$SYSTEMD_ANALYZE" security --no-pager --offline=true "$unit" 2>&1) \
    || { printf '%s\n' "$security_out"; fail "systemd-analyze security failed"; }
exposure=$(sed -nE 's/.*Overall exposure level for [^:]+: ([0-9]+(\.[0-9]+)?).*/\1/p' <<<"$security_out")
[[ -n $exposure ]] || { printf '%s\n' "$security_out"; fail "no exposure level in the output"; }
grep '✗' <<<"$security_out" | sed -E 's/^/    | /; s/[[:space:]]+$//' || true
if awk -v e="$exposure" -v max="$max_exposure" 'BEGIN { exit !(e + 0 <= max + 0) }'; then
    ok "exposure $exposure"
else
    fail "exposure $exposure is above $max_exposure"
fi

# ---------------------------------------------------------------------------- YAML

step "yamllint -s -c $yamllint_config $k8s deploy/prometheus"
"${YAMLLINT[@]}" -s -c "$yamllint_config" "$k8s" deploy/prometheus "$yamllint_config"
ok "$(find "$k8s" deploy/prometheus -name '*.y*ml' | wc -l) files lint clean"

# ---------------------------------------------------------------------------- Kubernetes

# validate_manifests FILE...: strict schema validation against the latest Kubernetes and the
# oldest one supported.
validate_manifests() {
    local version out args
    for version in latest "$min_kubernetes"; do
        args=(--strict)
        [[ $version == latest ]] || args+=(-k "$version")
        step "kubernetes-validate ${args[*]} $*"
        out=$("${KUBERNETES_VALIDATE[@]}" "${args[@]}" "$@" 2>&1) \
            || { printf '%s\n' "$out"; fail "invalid manifest"; }
        printf '%s\n' "$out" | sed 's/^/    | /'
        # A WARN is a schema kubernetes-validate could not find (a typo in apiVersion or kind,
        # say): then nothing was validated, so it fails here.
        if grep -qv '^INFO ' <<<"$out"; then fail "not every resource was validated"; fi
        ok "$# manifests valid"
    done
}

core=("$k8s/configmap.yaml" "$k8s/secret.yaml" "$k8s/deployment.yaml" "$k8s/service.yaml")
validate_manifests "${core[@]}"

# ServiceMonitor (monitoring.coreos.com/v1) is a CRD, Kustomization and Component kustomize
# files: kubernetes-validate has no schema for them and only warns ("Couldn't find schema"),
# exit status 0; it has no flag to skip them. They are parsed here, and their references,
# like those of the other manifests, are checked below.
operator=$k8s/prometheus-operator
step "kubernetes-validate $operator/*.yaml $k8s/kustomization.yaml (no schemas: warnings expected)"
"${KUBERNETES_VALIDATE[@]}" "$operator/servicemonitor.yaml" "$operator/kustomization.yaml" \
    "$k8s/kustomization.yaml" 2>&1 | sed 's/^/    | /'

step "Kubernetes cross-references (selectors, ports, volumes, kustomization resources)"
"${PYTHON[@]}" - "$k8s" <<'PY'
import os, sys, yaml

k8s = sys.argv[1]
operator = os.path.join(k8s, "prometheus-operator")
docs = {}
for d in (k8s, operator):
    for name in sorted(os.listdir(d)):
        if name.endswith(".yaml"):
            with open(os.path.join(d, name)) as f:
                for doc in yaml.safe_load_all(f):
                    if doc:
                        docs[doc["kind"]] = doc
problems = []

def check(cond, msg):
    if not cond:
        problems.append(msg)
    else:
        print("    ok:", msg)

def subset(small, big):
    return all(big.get(k) == v for k, v in (small or {}).items())

kust, dep, svc, sm = docs["Kustomization"], docs["Deployment"], docs["Service"], docs["ServiceMonitor"]
cm, secret, component = docs["ConfigMap"], docs["Secret"], docs["Component"]
files = {n for n in os.listdir(k8s) if n.endswith(".yaml") and n != "kustomization.yaml"}
check(set(kust["resources"]) == files, "kustomization lists every manifest: %s" % sorted(files))
check(component["resources"] == ["servicemonitor.yaml"], "the prometheus-operator component adds the ServiceMonitor")
# One scrape path: the component that adds the ServiceMonitor removes every prometheus.io
# annotation, and the default kustomization does not include the component.
annotations = {k for k in dep["spec"]["template"]["metadata"].get("annotations", {}) if k.startswith("prometheus.io/")}
removed = set()
for p in component.get("patches", []):
    if p.get("target", {}).get("kind") == "Deployment" and p["target"].get("name") == dep["metadata"]["name"]:
        for op in yaml.safe_load(p["patch"]):
            prefix = "/spec/template/metadata/annotations/"
            if op.get("op") == "remove" and op["path"].startswith(prefix):
                removed.add(op["path"][len(prefix):].replace("~1", "/").replace("~0", "~"))
check(annotations and removed == annotations,
      "the component removes the scrape annotations %s (one scrape path)" % sorted(annotations))
check("prometheus-operator" not in (kust.get("components") or []),
      "the default kustomization scrapes through the annotations only")
router_image = next(c["image"] for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "webio-router")
check(any(i["name"] == router_image.split(":")[0] for i in kust.get("images", [])),
      "kustomization's images entry names the router image %s" % router_image)

pod = dep["spec"]["template"]
check(subset(dep["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]),
      "Deployment selector matches its pod labels")
check(subset(svc["spec"]["selector"], pod["metadata"]["labels"]), "Service selector matches the pods")
containers = {c["name"]: c for c in pod["spec"]["containers"]}
router = containers["webio-router"]
router_ports = {p["name"]: p["containerPort"] for p in router["ports"]}
for p in svc["spec"]["ports"]:
    check(p["targetPort"] in router_ports, "Service port %s targets router port %s" % (p["name"], p["targetPort"]))
check(subset(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]), "ServiceMonitor selects the Service")
svc_ports = {p["name"] for p in svc["spec"]["ports"]}
for e in sm["spec"]["endpoints"]:
    check(e["port"] in svc_ports and e.get("path") == "/metrics",
          "ServiceMonitor scrapes /metrics on Service port %s" % e["port"])
ann = pod["metadata"]["annotations"]
check(ann.get("prometheus.io/scrape") == "true" and int(ann["prometheus.io/port"]) == router_ports["admin"]
      and ann.get("prometheus.io/path") == "/metrics", "prometheus.io annotations point at the admin port")
for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
    get = router.get(probe, {}).get("httpGet", {})
    check(get.get("port") in ("admin", router_ports["admin"]), "%s on the admin port (%s)" % (probe, get.get("path")))
check(router["livenessProbe"]["httpGet"]["path"] == "/healthz" and router["readinessProbe"]["httpGet"]["path"] == "/readyz",
      "liveness on /healthz, readiness on /readyz")

volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
mounts = {m["name"]: m["mountPath"] for m in router["volumeMounts"]}
check(set(mounts) <= set(volumes), "every router volumeMount has a volume")
check(volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
      and {"webio-router.toml", "routes.toml"} <= set(cm["data"]), "config volume is the ConfigMap with both files")
check(volumes["jwt-secret"]["secret"]["secretName"] == secret["metadata"]["name"], "secret volume is the Secret")
env = {e["name"]: e.get("value") for e in router.get("env", [])}
secret_files = yaml.safe_load(env["WEBIO_ROUTER_AUTH__SECRET_FILES"])
keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
check(all(os.path.dirname(f) == mounts["jwt-secret"] and os.path.basename(f) in keys for f in secret_files),
      "WEBIO_ROUTER_AUTH__SECRET_FILES names files of the mounted Secret: %s" % secret_files)
config = cm["data"]["webio-router.toml"]
check(mounts["state"] + "/spool" in config and mounts["state"] + "/dead-letter.jsonl" in config,
      "spool_dir and dead_letter_file are on the state volume")
args = router.get("args", [])
check(args[:2] == ["--config", mounts["config"] + "/webio-router.toml"], "router reads the mounted config")
check(pod["spec"].get("enableServiceLinks") is False, "no service-link WEBIO_ROUTER_* variables injected")
check(pod["spec"]["terminationGracePeriodSeconds"] > 20, "terminationGracePeriodSeconds > shutdown_timeout")
sc = router["securityContext"]
check(sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
      and sc.get("capabilities", {}).get("drop") == ["ALL"]
      and (sc.get("runAsNonRoot") or pod["spec"].get("securityContext", {}).get("runAsNonRoot")),
      "router runs non-root, read-only, without capabilities")
if problems:
    for p in problems:
        print("    FAILED:", p, file=sys.stderr)
    sys.exit(1)
PY

# ---------------------------------------------------------------------------- Kubernetes gateway

gateway=$k8s/gateway
gateway_manifests=("$gateway/configmap.yaml" "$gateway/secret.yaml" "$gateway/statefulset.yaml"
    "$gateway/service.yaml" "$gateway/poddisruptionbudget.yaml" "$gateway/redis.yaml")
validate_manifests "${gateway_manifests[@]}"

step "Kubernetes gateway cross-references (StatefulSet, claims, Services, PDB, Redis dedup, hardening)"
"${PYTHON[@]}" - "$gateway" <<'PY'
import os, re, sys, yaml

gw = sys.argv[1]
docs = []
for name in sorted(os.listdir(gw)):
    if name.endswith(".yaml"):
        with open(os.path.join(gw, name)) as f:
            docs += [(name, d) for d in yaml.safe_load_all(f) if d]
problems = []

def check(cond, msg):
    if not cond:
        problems.append(msg)
    else:
        print("    ok:", msg)

def subset(small, big):
    return bool(small) and all(big.get(k) == v for k, v in small.items())

def one(kind, name=None):
    found = [d for _, d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, "expected one %s %s, found %d" % (kind, name or "", len(found))
    return found[0]

kust = one("Kustomization")
files = {n for n in os.listdir(gw) if n.endswith(".yaml") and n != "kustomization.yaml"}
check(set(kust["resources"]) == files, "kustomization lists every manifest: %s" % sorted(files))
sts = one("StatefulSet")
pod = sts["spec"]["template"]
labels = pod["metadata"]["labels"]
check(subset(sts["spec"]["selector"]["matchLabels"], labels), "StatefulSet selector matches its pod labels")
check(sts["spec"]["replicas"] >= 2, "more than one replica (%d)" % sts["spec"]["replicas"])
headless = one("Service", sts["spec"]["serviceName"])
check(headless["spec"].get("clusterIP") == "None" and subset(headless["spec"]["selector"], labels),
      "serviceName %s is a headless Service selecting the pods" % sts["spec"]["serviceName"])
router = {c["name"]: c for c in pod["spec"]["containers"]}["webio-router"]
router_image = router["image"]
check(any(i["name"] == router_image.split(":")[0] for i in kust.get("images", [])),
      "kustomization's images entry names the router image %s" % router_image)
router_ports = {p["name"]: p["containerPort"] for p in router["ports"]}
services = [d for _, d in docs if d["kind"] == "Service" and subset(d["spec"]["selector"], labels)]
front = [s for s in services if s["spec"].get("clusterIP") != "None"]
check(len(front) == 1 and any(p["targetPort"] == "webhook" for p in front[0]["spec"]["ports"]),
      "one load-balancing Service sends webhooks to the replicas")
for s in services:
    for p in s["spec"]["ports"]:
        check(p["targetPort"] in router_ports, "Service %s port %s targets router port %s"
              % (s["metadata"]["name"], p["name"], p["targetPort"]))
pdb = one("PodDisruptionBudget")
check(subset(pdb["spec"]["selector"]["matchLabels"], labels), "PodDisruptionBudget selects the replicas")
check(pdb["spec"].get("maxUnavailable") == 1 or
      (isinstance(pdb["spec"].get("minAvailable"), int) and pdb["spec"]["minAvailable"] < sts["spec"]["replicas"]),
      "the PodDisruptionBudget lets one replica go at a time")

claims = {c["metadata"]["name"]: c for c in sts["spec"].get("volumeClaimTemplates", [])}
mounts = {m["name"]: m["mountPath"] for m in router["volumeMounts"]}
volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
check("state" in claims and "state" not in volumes and "ReadWriteOnce" in claims["state"]["spec"]["accessModes"],
      "the state volume is a PersistentVolumeClaim per replica (volumeClaimTemplates)")
check(set(mounts) <= set(volumes) | set(claims), "every router volumeMount has a volume or a claim")
retention = sts["spec"].get("persistentVolumeClaimRetentionPolicy", {})
check(retention.get("whenScaled") == "Retain" and retention.get("whenDeleted") == "Retain",
      "spool claims are kept on scale-down and deletion")
cm = one("ConfigMap", volumes["config"]["configMap"]["name"])
secret = one("Secret", volumes["jwt-secret"]["secret"]["secretName"])
check({"webio-router.toml", "routes.toml"} <= set(cm["data"]), "config volume is the ConfigMap with both files")
env = {e["name"]: e.get("value") for e in router.get("env", [])}
secret_files = yaml.safe_load(env["WEBIO_ROUTER_AUTH__SECRET_FILES"])
keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
check(all(os.path.dirname(f) == mounts["jwt-secret"] and os.path.basename(f) in keys for f in secret_files),
      "WEBIO_ROUTER_AUTH__SECRET_FILES names files of the mounted Secret: %s" % secret_files)
config = cm["data"]["webio-router.toml"]
check(re.search(r'^mode = "spool"$', config, re.M) and mounts["state"] + "/spool" in config
      and mounts["state"] + "/dead-letter.jsonl" in config, "spool mode, spool and dead letters on the claim")
store = re.search(r'^dedup_store = "(redis://[^"/:]+)(:(\d+))?(/\d+)?"$', config, re.M)
check(store is not None, "delivery.dedup_store is a Redis URL")
if store:
    host, port = store.group(1)[len("redis://"):], int(store.group(3) or 6379)
    redis_svc = [d for _, d in docs if d["kind"] == "Service" and d["metadata"]["name"] == host]
    if redis_svc:
        redis_dep = one("Deployment", host)
        rpod = redis_dep["spec"]["template"]
        check(any(p["port"] == port for p in redis_svc[0]["spec"]["ports"])
              and subset(redis_svc[0]["spec"]["selector"], rpod["metadata"]["labels"]),
              "dedup_store's host %s:%d is the Redis Service of redis.yaml" % (host, port))
        policy = one("NetworkPolicy")
        check(subset(policy["spec"]["podSelector"]["matchLabels"], rpod["metadata"]["labels"])
              and any(subset(f["podSelector"]["matchLabels"], labels) for r in policy["spec"]["ingress"] for f in r["from"]),
              "only the gateway replicas may reach Redis")
        rsc = rpod["spec"]["containers"][0]["securityContext"]
        check(rsc.get("readOnlyRootFilesystem") and rsc.get("allowPrivilegeEscalation") is False
              and rsc.get("capabilities", {}).get("drop") == ["ALL"] and rpod["spec"]["securityContext"].get("runAsNonRoot"),
              "Redis runs non-root, read-only, without capabilities")
    else:
        print("    note: dedup_store points outside this kustomization (%s)" % host)
for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
    get = router.get(probe, {}).get("httpGet", {})
    check(get.get("port") in ("admin", router_ports["admin"]), "%s on the admin port (%s)" % (probe, get.get("path")))
check(router["livenessProbe"]["httpGet"]["path"] == "/healthz" and router["readinessProbe"]["httpGet"]["path"] == "/readyz",
      "liveness on /healthz, readiness on /readyz")
ann = pod["metadata"].get("annotations", {})
check(ann.get("prometheus.io/scrape") == "true" and int(ann["prometheus.io/port"]) == router_ports["admin"],
      "prometheus.io annotations point at the admin port")
args = router.get("args", [])
check(args[:2] == ["--config", mounts["config"] + "/webio-router.toml"], "router reads the mounted config")
check(pod["spec"].get("enableServiceLinks") is False, "no service-link WEBIO_ROUTER_* variables injected")
timeout = re.search(r'^shutdown_timeout = "(\d+)s"$', config, re.M)
check(timeout and pod["spec"]["terminationGracePeriodSeconds"] > int(timeout.group(1)),
      "terminationGracePeriodSeconds > shutdown_timeout")
sc = router["securityContext"]
check(sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
      and sc.get("capabilities", {}).get("drop") == ["ALL"]
      and (sc.get("runAsNonRoot") or pod["spec"].get("securityContext", {}).get("runAsNonRoot")),
      "router runs non-root, read-only, without capabilities")
if problems:
    for p in problems:
        print("    FAILED:", p, file=sys.stderr)
    sys.exit(1)
PY

if command -v kubectl >/dev/null; then
    step "kubectl kustomize $gateway"
    gateway_out=$(kubectl kustomize "$gateway")
    for kind in StatefulSet Service PodDisruptionBudget ConfigMap Secret Deployment NetworkPolicy; do
        grep -q "^kind: $kind\$" <<<"$gateway_out" || fail "the gateway renders no $kind"
    done
    ok "renders $(grep -c '^kind: ' <<<"$gateway_out") resources"
fi

# kubectl's built-in kustomize, where present, renders both variants: each must scrape once.
if command -v kubectl >/dev/null; then
    step "kubectl kustomize: one scrape path with and without the prometheus-operator component"
    default_out=$(kubectl kustomize "$k8s")
    cp -r "$k8s" "$work/k8s"
    sed -i 's/^# components:/components:/; s/^#   - prometheus-operator/  - prometheus-operator/' \
        "$work/k8s/kustomization.yaml"
    operator_out=$(kubectl kustomize "$work/k8s")
    grep -q 'prometheus.io/scrape' <<<"$default_out" && ! grep -q 'kind: ServiceMonitor' <<<"$default_out" \
        || fail "default: expected the annotations and no ServiceMonitor"
    ! grep -q 'prometheus.io/' <<<"$operator_out" && grep -q 'kind: ServiceMonitor' <<<"$operator_out" \
        || fail "prometheus-operator: expected a ServiceMonitor and no annotations"
    ok "default: annotations only; prometheus-operator: ServiceMonitor only"
else
    step "kubectl kustomize: skipped (kubectl not installed; the structure was checked above)"
fi

# ---------------------------------------------------------------------------- Prometheus

step "promtool check rules $rules"
"$PROMTOOL" check rules "$rules" | sed 's/^/    | /'
step "promtool test rules $rule_tests"
"$PROMTOOL" test rules "$rule_tests" | sed 's/^/    | /'

# ---------------------------------------------------------------------------- Grafana

step "python3 -m json.tool $dashboard"
python3 -m json.tool "$dashboard" >/dev/null
python3 - "$dashboard" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
panels = d["panels"]
ids = [p["id"] for p in panels]
assert len(ids) == len(set(ids)), "panel ids are not unique"
assert d.get("uid") and d.get("schemaVersion"), "uid and schemaVersion are required"
names = [v["name"] for v in d["templating"]["list"]]
assert "datasource" in names, "no datasource variable"
for p in panels:
    if p["type"] != "row":
        assert p["targets"] and all(t.get("expr") for t in p["targets"]), "panel %r has no query" % p["title"]
        assert p["datasource"]["uid"] == "${datasource}", "panel %r ignores the datasource variable" % p["title"]
print("    ok: %d panels, schemaVersion %s, variables %s" % (
    sum(p["type"] != "row" for p in panels), d["schemaVersion"], names))
PY

# set -e stops at the first failure, so reaching this line means every check passed.
step "all deployment checks passed"
