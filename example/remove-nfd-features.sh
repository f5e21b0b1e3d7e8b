#!/usr/bin/env bash
# Remove the demo's flavor label (or the label keys given) from every node.
#   bash example/remove-nfd-features.sh [key ...]
set -euo pipefail
keys=("${@:-feature.node.ocifit-k8s.flavor}")
kubectl label nodes --all "${keys[@]/%/-}"
