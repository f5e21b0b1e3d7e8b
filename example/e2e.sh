#!/usr/bin/env bash
# `make e2e`: the upstream demo end to end on kind, with a local registry on the kind network.
# Needs docker (with an engine), kind, kubectl, openssl, and python3 with the `oras` package
# (`make test` installs it in .venv). Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${KIND_CLUSTER:-ocifit}-e2e
IMAGE=${IMAGE:-ghcr.io/compspec/ocifit}
TAG=${TAG:-e2e}
REGISTRY=ocifit-e2e-registry
REGISTRY_PORT=${REGISTRY_PORT:-5001}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=$PWD/.venv/bin/python
ARTIFACT="$REGISTRY:5000/ocifit-k8s-compatibility:kind-example"
step() { printf '\n=== %s\n' "$*"; }

cleanup() {
  kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  docker rm -f "$REGISTRY" >/dev/null 2>&1 || true
}
trap cleanup EXIT

step "cluster $CLUSTER and a registry on the kind network"
kind create cluster --name "$CLUSTER" --config example/kind-config.yaml --wait 120s
docker run -d --name "$REGISTRY" -p "127.0.0.1:$REGISTRY_PORT:5000" registry:2 >/dev/null
docker network connect kind "$REGISTRY"

step "push the flavor artifact with oras"
(cd example && "$PY" -c "
import oras.client
client = oras.client.OrasClient(hostname='127.0.0.1:$REGISTRY_PORT', insecure=True)
client.push(target='127.0.0.1:$REGISTRY_PORT/ocifit-k8s-compatibility:kind-example',
            files=['compatibility-test.json:application/vnd.oci.image.compatibilities.v1+json'])")

step "build and load ocifit, install it (certificates by make certs)"
make build kind-load IMAGE="$IMAGE" TAG="$TAG" KIND_CLUSTER="$CLUSTER"
make install IMAGE="$IMAGE" TAG="$TAG" CERT_MANAGER=false
kubectl -n ocifit-system patch configmap ocifit-config --type=merge \
  -p "{\"data\":{\"OCIFIT_INSECURE_REGISTRIES\":\"$REGISTRY:5000\",\"OCIFIT_ALLOWED_REGISTRIES\":\"$REGISTRY:5000\"}}"
make certs CERT_DIR="$(mktemp -d)"
kubectl -n ocifit-system rollout restart deployment/ocifit
kubectl -n ocifit-system rollout status deployment/ocifit --timeout=180s

run_pod() {  # flavor -> the os-release ID the pod must print
  bash example/remove-nfd-features.sh >/dev/null 2>&1 || true
  bash example/add-nfd-features.sh "feature.node.ocifit-k8s.flavor=$1"
  sleep 2  # the watch delivers the relabel; ocifit sees it within a second or two
  kubectl delete pod flavor-test --ignore-not-found --wait=true
  sed "s|ghcr.io/compspec/ocifit-k8s-compatibility:kind-example|$ARTIFACT|" example/pod.yaml | kubectl apply -f -
  kubectl wait --for=jsonpath='{.status.phase}'=Succeeded pod/flavor-test --timeout=180s
  kubectl get pod flavor-test -o jsonpath='{.spec.containers[0].image}{"\n"}'
  kubectl logs flavor-test | tee /dev/stderr | grep -q "^ID=$2\$"
}

step "vanilla nodes -> Debian"
run_pod vanilla debian
step "chocolate nodes -> Ubuntu"
run_pod chocolate ubuntu
step "e2e passed"
