# The README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3

help:
	@echo "make demo         start the local cluster (built on first use), run the operator, apply an example"
	@echo "make test         lint, types, unit/golden/kmock tests and the e2e suite on the local cluster"
	@echo "make cluster-up   start the local cluster; prints export KUBECONFIG=..."
	@echo "make cluster-down stop it and remove its state"
	@echo "make bench        run the benchmarks in bench/"
	@echo "make bench-generalise  the autoscaling generalisation benchmark alone (~50 min on 2 cores, resumable)"
	@echo "make crd          regenerate crds/ (and the chart's copy) from the models"

demo:
	@hack/demo.sh

test:
	@hack/test.sh

cluster-up: venv
	@.venv/bin/python hack/cluster.py up

cluster-down:
	@$(PYTHON) hack/cluster.py down

venv:
	@bash -c 'source hack/venv.sh'

crd: venv
	@.venv/bin/disagg crd > crds/disagg.dev_inferenceservices.yaml
	@cp crds/disagg.dev_inferenceservices.yaml charts/disagg-operator/crds/disagg.dev_inferenceservices.yaml
	@.venv/bin/disagg reference --update README.md

bench: venv
	@for b in bench/*.py; do echo "==> $$b"; .venv/bin/python "$$b" || exit 1; done

bench-generalise: venv
	@.venv/bin/python bench/generalise.py --jobs 2

.PHONY: help demo test cluster-up cluster-down venv crd bench bench-generalise
