#!/usr/bin/env bash
# The offline demo: serve ocifit over HTTPS on the example nodes with the example spec, post the example
# AdmissionReviews to it, and show what it answers. Needs python3, openssl and curl; no cluster.
# The server's own log goes to a file and is shown at the end, apart from the answers.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${DEMO_PORT:-18443}
NODES=${DEMO_NODES:-example/nodes-homogeneous.json}
REF=ghcr.io/compspec/ocifit-k8s-compatibility:kind-example
tmp=$(mktemp -d)
pid=
finish() {
  status=$?
  [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
  if ((status)) && [ -s "$tmp/server.log" ]; then
    echo "=== the server's log" >&2
    cat "$tmp/server.log" >&2
  fi
  rm -rf "$tmp"
}
trap finish EXIT

# What each review is expected to get on the homogeneous example nodes (all vanilla).
expected() {
  case "$1" in
    *not-enabled.json) echo "allowed, untouched: the pod did not opt in" ;;
    *pod-chocolate.json) echo "denied: the pod's nodeSelector wants chocolate nodes, and these nodes are all vanilla" ;;
    *) echo "allowed, with a patch to the vanilla image debian:11" ;;
  esac
}

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$tmp/tls.key" -out "$tmp/tls.crt" 2>/dev/null
python3 ocifit.py serve --port "$PORT" --bind 127.0.0.1 --cert "$tmp/tls.crt" --key "$tmp/tls.key" \
  --nodes "$NODES" --artifact "$REF=example/compatibility-test.json" 2>"$tmp/server.log" &
pid=$!
for _ in $(seq 50); do curl -fsS --cacert "$tmp/tls.crt" "https://localhost:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done

for review in example/reviews/*.json; do
  echo
  echo "=== POST /mutate $review"
  [ "$NODES" != example/nodes-homogeneous.json ] || echo "expected: $(expected "$review")"
  curl -fsS --cacert "$tmp/tls.crt" -H 'Content-Type: application/json' --data-binary "@$review" \
    "https://localhost:$PORT/mutate" | python3 -c '
import base64, json, sys
response = json.load(sys.stdin)["response"]
print("allowed:", response["allowed"])
if "status" in response:
    print("message:", response["status"]["message"])
if "patch" in response:
    print("patch:", json.dumps(json.loads(base64.b64decode(response["patch"])), indent=2))'
done
echo
echo "=== the same pod on a cluster whose workers disagree (example/nodes-heterogeneous.json)"
echo "expected: denied: two workers want debian:11, one wants ubuntu:24.04, and the pod does not say which"
if python3 ocifit.py review example/reviews/pod.json --nodes example/nodes-heterogeneous.json \
    --artifact "$REF=example/compatibility-test.json" --patch --log-level error 2>&1; then
  echo "unexpected: allowed" >&2
  exit 1
fi
echo
echo "=== pinned with a nodeSelector on that cluster (example/reviews/pod-chocolate.json)"
echo "expected: allowed, with a patch to the chocolate image ubuntu:24.04"
python3 ocifit.py review example/reviews/pod-chocolate.json --nodes example/nodes-heterogeneous.json \
  --artifact "$REF=example/compatibility-test.json" --patch --log-level error
kill "$pid"
wait "$pid" || true
pid=
echo
echo "=== the server's log"
cat "$tmp/server.log"
