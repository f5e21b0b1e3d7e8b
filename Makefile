# ocifit — `make help` lists the targets. Override IMAGE, TAG, KIND_CLUSTER, KUBECTL, CERT_MANAGER as needed.
PYTHON ?= python3
VENV ?= .venv
IMAGE ?= ghcr.io/compspec/ocifit
TAG ?= latest
PYTHON_IMAGE ?= python:3.12-slim
KIND_CLUSTER ?= ocifit
KUBECTL ?= kubectl
NAMESPACE ?= ocifit-system
CERT_DIR ?= certs
CERT_MANAGER ?= true

# A filter from deploy.yaml (stdin) to what is applied: the chosen images, and no cert-manager objects
# when CERT_MANAGER=false.
RENDER = $(PYTHON) -c 'import sys; cert_manager, image, base = sys.argv[1:]; \
  docs = [d for d in sys.stdin.read().split("\n---\n") if cert_manager != "false" or "apiVersion: cert-manager.io/" not in d]; \
  print("\n---\n".join(docs).replace("ghcr.io/compspec/ocifit:latest", image).replace("image: python:3.12-slim", "image: " + base))' \
  "$(CERT_MANAGER)" "$(IMAGE):$(TAG)" "$(PYTHON_IMAGE)"
SAN = DNS:ocifit.$(NAMESPACE).svc,DNS:ocifit.$(NAMESPACE).svc.cluster.local,DNS:ocifit.$(NAMESPACE)

.PHONY: help demo test bench build push kind-load install install-configmap uninstall certs e2e
.DEFAULT_GOAL := help

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

demo: ## serve ocifit on the example nodes and post the example reviews to it (no cluster needed)
	bash example/demo.sh

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: $(VENV)/.installed ## install the test needs (in .venv) and run the tests
	$(VENV)/bin/python -m pytest -q test_ocifit.py

bench: $(VENV)/.installed ## print the performance figures (needs wrk and docker-registry; see README)
	cd bench && ../$(VENV)/bin/python admission.py && ../$(VENV)/bin/python storm.py && ../$(VENV)/bin/python nodes.py

build: ## build the image $(IMAGE):$(TAG)
	docker build -t $(IMAGE):$(TAG) .

push: ## push the image
	docker push $(IMAGE):$(TAG)

kind-load: ## load the image into the kind cluster $(KIND_CLUSTER)
	kind load docker-image $(IMAGE):$(TAG) --name $(KIND_CLUSTER)

install: ## apply deploy.yaml (CERT_MANAGER=false: leave out cert-manager objects, then run `make certs`)
	$(RENDER) < deploy.yaml | $(KUBECTL) apply -f -

install-configmap: ## install with a stock $(PYTHON_IMAGE) and ocifit.py from a ConfigMap (no image build)
	$(KUBECTL) kustomize --load-restrictor LoadRestrictionsNone example/configmap-install | $(RENDER) | \
	  $(KUBECTL) apply -f -

uninstall: ## remove everything deploy.yaml created
	$(RENDER) < deploy.yaml | $(KUBECTL) delete --ignore-not-found -f -

certs: ## without cert-manager: openssl CA + serving cert, TLS Secret, CA patched into the webhook
	mkdir -p $(CERT_DIR)
	openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=ocifit-ca" \
	  -keyout $(CERT_DIR)/ca.key -out $(CERT_DIR)/ca.crt 2>/dev/null
	openssl req -newkey rsa:2048 -nodes -subj "/CN=ocifit.$(NAMESPACE).svc" \
	  -keyout $(CERT_DIR)/tls.key -out $(CERT_DIR)/tls.csr 2>/dev/null
	printf 'subjectAltName=$(SAN)\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' \
	  > $(CERT_DIR)/tls.ext
	openssl x509 -req -in $(CERT_DIR)/tls.csr -CA $(CERT_DIR)/ca.crt -CAkey $(CERT_DIR)/ca.key -CAcreateserial \
	  -days 365 -extfile $(CERT_DIR)/tls.ext -out $(CERT_DIR)/tls.crt 2>/dev/null
	openssl verify -CAfile $(CERT_DIR)/ca.crt $(CERT_DIR)/tls.crt
	$(KUBECTL) -n $(NAMESPACE) create secret tls ocifit-tls --cert=$(CERT_DIR)/tls.crt --key=$(CERT_DIR)/tls.key \
	  --dry-run=client -o yaml | $(KUBECTL) apply -f -
	$(KUBECTL) patch mutatingwebhookconfiguration ocifit --type=json -p \
	  '[{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"'"$$(base64 < $(CERT_DIR)/ca.crt | tr -d '\n')"'"}]'

e2e: ## the whole story on kind: cluster, registry, artifact, ocifit; vanilla -> Debian, chocolate -> Ubuntu
	IMAGE=$(IMAGE) TAG=$(TAG) KIND_CLUSTER=$(KIND_CLUSTER) PYTHON=$(PYTHON) bash example/e2e.sh
