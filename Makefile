# ocifit — `make help` lists the targets. Override IMAGE, TAG, BASE_IMAGE, KIND_CLUSTER, KUBECTL, CERT_MANAGER as needed.
# Recipes run in bash with -euo pipefail: a command that fails anywhere in a pipe fails the target.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
VENV ?= .venv
# The image is tagged with ocifit's own version, ocifit.py's __version__.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' ocifit.py)
IMAGE ?= ghcr.io/compspec/ocifit
TAG ?= $(VERSION)
# The Python base of the image (the Dockerfile's default) and the stock image of install-configmap.
BASE_IMAGE ?= $(shell sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
KIND_CLUSTER ?= ocifit
KUBECTL ?= kubectl
NAMESPACE ?= ocifit-system
CERT_DIR ?= certs
CERT_MANAGER ?= true

# A filter from deploy.yaml (stdin) to what is applied: $(IMAGE):$(TAG) for ocifit's image, no cert-manager
# objects when CERT_MANAGER=false, and of the objects `all`, only the `deployment` or the `rest`.
RENDER = $(PYTHON) -c 'import re, sys; cert_manager, image, keep = sys.argv[1:]; \
  docs = [d for d in sys.stdin.read().split("\n---\n") \
          if (cert_manager != "false" or "apiVersion: cert-manager.io/" not in d) \
          and (keep == "all" or (keep == "deployment") == bool(re.search("^kind: Deployment$$", d, re.M)))]; \
  print(re.sub("ghcr[.]io/compspec/ocifit:[^\n ]+", image, "\n---\n".join(docs)))' "$(CERT_MANAGER)" "$(IMAGE):$(TAG)"
# install-configmap: the Deployment runs ocifit.py, mounted from the ConfigMap ocifit-code, on a stock
# $(BASE_IMAGE). The code's sha256 in the pod template rolls the pods when ocifit.py changes.
CODE_SHA256 = $(firstword $(shell sha256sum ocifit.py))
CODE_PATCH = [{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "$(BASE_IMAGE)"}, \
  {"op": "add", "path": "/spec/template/spec/containers/0/command", "value": ["python3", "/opt/ocifit/ocifit.py", "serve"]}, \
  {"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-", \
   "value": {"name": "code", "mountPath": "/opt/ocifit", "readOnly": true}}, \
  {"op": "add", "path": "/spec/template/spec/volumes/-", "value": {"name": "code", "configMap": {"name": "ocifit-code"}}}, \
  {"op": "add", "path": "/spec/template/metadata/annotations", "value": {"ocifit.compspec.io/code-sha256": "$(CODE_SHA256)"}}]
SAN = DNS:ocifit.$(NAMESPACE).svc,DNS:ocifit.$(NAMESPACE).svc.cluster.local,DNS:ocifit.$(NAMESPACE)

.PHONY: help demo test lint bench build push kind-load install install-configmap uninstall certs e2e
.DEFAULT_GOAL := help

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

demo: ## serve ocifit on the example nodes and post the example reviews to it (no cluster needed)
	bash example/demo.sh

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: lint $(VENV)/.installed ## install the test needs (in .venv), lint and type-check, run the tests (skip reasons shown)
	$(VENV)/bin/python -m pytest -q -rs test_ocifit.py

lint: $(VENV)/.installed ## ruff (lint) and mypy (types) with the settings in pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(VENV)/.installed ## print the performance figures (needs wrk and docker-registry; see README)
	cd bench && ../$(VENV)/bin/python admission.py && ../$(VENV)/bin/python storm.py && ../$(VENV)/bin/python nodes.py \
	  && ../$(VENV)/bin/python nodefeatures.py && ../$(VENV)/bin/python attack.py

build: ## build the image IMAGE:TAG (TAG: ocifit's version) on BASE_IMAGE
	docker build --build-arg BASE_IMAGE="$(BASE_IMAGE)" --build-arg VERSION="$(VERSION)" -t $(IMAGE):$(TAG) .

push: ## push the image IMAGE:TAG
	docker push $(IMAGE):$(TAG)

kind-load: ## load the image IMAGE:TAG into the kind cluster KIND_CLUSTER
	kind load docker-image $(IMAGE):$(TAG) --name $(KIND_CLUSTER)

install: ## apply deploy.yaml with the image IMAGE:TAG (CERT_MANAGER=false: without cert-manager, then `make certs`)
	$(RENDER) all < deploy.yaml | $(KUBECTL) apply -f -

install-configmap: ## no image build: a stock BASE_IMAGE runs ocifit.py from the ConfigMap ocifit-code
	$(RENDER) rest < deploy.yaml | $(KUBECTL) apply -f -
	$(KUBECTL) -n $(NAMESPACE) create configmap ocifit-code --from-file=ocifit.py --dry-run=client -o yaml | \
	  $(KUBECTL) apply --server-side -f -
	$(RENDER) deployment < deploy.yaml | $(KUBECTL) patch --local -f - --type=json -p '$(CODE_PATCH)' -o yaml | \
	  $(KUBECTL) apply -f -

uninstall: ## remove everything deploy.yaml created
	$(RENDER) all < deploy.yaml | $(KUBECTL) delete --ignore-not-found -f -

certs: ## without cert-manager: an openssl CA (kept while it has a year left), serving cert, TLS Secret, caBundle
	mkdir -p $(CERT_DIR)
	if ! { [ -f $(CERT_DIR)/ca.key ] && [ -f $(CERT_DIR)/ca.crt ] && \
	       openssl x509 -checkend 31536000 -noout -in $(CERT_DIR)/ca.crt >/dev/null; }; then \
	  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out $(CERT_DIR)/ca.key; \
	  openssl req -x509 -new -key $(CERT_DIR)/ca.key -days 3650 -subj "/CN=ocifit-ca" \
	    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign -out $(CERT_DIR)/ca.crt; \
	fi
	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out $(CERT_DIR)/tls.key
	openssl req -new -key $(CERT_DIR)/tls.key -subj "/CN=ocifit.$(NAMESPACE).svc" -out $(CERT_DIR)/tls.csr
	printf '%s\n' basicConstraints=critical,CA:FALSE subjectAltName=$(SAN) extendedKeyUsage=serverAuth \
	  keyUsage=critical,digitalSignature > $(CERT_DIR)/tls.ext
	openssl x509 -req -in $(CERT_DIR)/tls.csr -CA $(CERT_DIR)/ca.crt -CAkey $(CERT_DIR)/ca.key -CAcreateserial \
	  -days 365 -extfile $(CERT_DIR)/tls.ext -out $(CERT_DIR)/tls.crt
	openssl verify -CAfile $(CERT_DIR)/ca.crt $(CERT_DIR)/tls.crt
	$(KUBECTL) -n $(NAMESPACE) create secret tls ocifit-tls --cert=$(CERT_DIR)/tls.crt --key=$(CERT_DIR)/tls.key \
	  --dry-run=client -o yaml | $(KUBECTL) apply -f -
	$(KUBECTL) patch mutatingwebhookconfiguration ocifit --type=json -p \
	  '[{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"'"$$(base64 < $(CERT_DIR)/ca.crt | tr -d '\n')"'"}]'

e2e: ## the whole story on kind: cluster, registry, artifact, ocifit; vanilla -> Debian, chocolate -> Ubuntu
	IMAGE=$(IMAGE) TAG=$(TAG) KIND_CLUSTER=$(KIND_CLUSTER) PYTHON=$(PYTHON) bash example/e2e.sh
