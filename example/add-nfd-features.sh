#!/usr/bin/env bash
# Label every worker node with the given labels, as NFD's local feature files would (a demo stand-in).
#   bash example/add-nfd-features.sh "feature.node.ocifit-k8s.flavor=vanilla"
set -euo pipefail
if [ "$#" -eq 0 ]; then echo "usage: $0 key=value [key=value ...]" >&2; exit 2; fi
kubectl label nodes --selector '!node-role.kubernetes.io/control-plane' --overwrite "$@"
