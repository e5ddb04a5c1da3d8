# Quick start: `make demo`, then `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint cog typecheck deploy-lint lock unit integration bench bench-memory bench-encodings soak clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "sweeper needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Two workers (pytest-xdist): one runs every test against the legacy emulator, the other every
# test against the Firestore emulator (tests/integration/conftest.py groups them), the unit
# tests fill in; on 2 cores the suite takes about 5 minutes instead of 8.
test: lint typecheck deploy-lint
	$(BIN)/pytest -q -n 2 --dist loadgroup --durations=15

lint: $(STAMP)
	$(BIN)/ruff check sweeper tests bench scripts
	$(BIN)/ruff format --check sweeper tests bench scripts
	$(BIN)/cog --check docs/options.md

# docs/options.md: both commands' real --help, and the --config keys from sweeper/settings.py.
cog: $(STAMP)
	$(BIN)/cog -r docs/options.md

typecheck: $(STAMP)
	$(BIN)/mypy

# Deployment artifacts: no Docker engine or cluster needed, all of it works offline.
# kubernetes-validate ships its schemas; the manifests are checked against the oldest
# Kubernetes they target and the newest schema bundled, as written and as `kubectl kustomize`
# renders them with deploy/site's values (kubectl comes with the Cloud SDK, as the emulators
# do). kubernetes-validate passes a resource whose schema it lacks (e.g. a mistyped apiVersion)
# with a mere WARN line and exit 0, so with --quiet any output at all fails the target. The
# IAM role files are not Kubernetes objects: yamllint only.
KUBERNETES_VERSIONS ?= 1.30 1.37
KUBERNETES_MANIFESTS := deploy/cronjob.yaml deploy/backlog/job.yaml
RENDERED := $(VENV)/rendered

deploy-lint: $(STAMP)
	$(BIN)/hadolint --failure-threshold warning Dockerfile
	$(BIN)/yamllint -s deploy
	@mkdir -p $(RENDERED)
	kubectl kustomize deploy > $(RENDERED)/deploy.yaml
	kubectl kustomize deploy/backlog > $(RENDERED)/backlog.yaml
	@for v in $(KUBERNETES_VERSIONS); do \
	  out=$$($(BIN)/kubernetes-validate --strict --quiet --kubernetes-version $$v \
	    $(KUBERNETES_MANIFESTS) $(RENDERED)/deploy.yaml $(RENDERED)/backlog.yaml 2>&1) \
	    && test -z "$$out" || { echo "$$out"; exit 1; }; \
	  echo "kubernetes-validate --strict --kubernetes-version $$v: ok"; \
	done

# requirements.lock: what the image installs, every file by its hash. Run after changing
# install_requires in setup.cfg, and to take new releases (the upgrade flag); commit the
# result. Local pip settings (mirrors, find-links) are ignored: the hashes are PyPI's.
lock: $(STAMP)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(BIN)/pip-compile --quiet --upgrade \
	  --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
	  --output-file requirements.lock setup.cfg

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache

# Side by side in one run each: on the bare emulators, then with 60 ms added each way (as
# production's round trips), then peak memory of the real CLI against the backlog's size, then
# the soak (about 8.5 minutes).
LATENCY_APPROACHES := sweeper "sweeper --no-verify" "bare loop" full-entity
bench: $(STAMP)
	$(BIN)/python bench/bench_sweep.py --emulator datastore
	$(BIN)/python bench/bench_sweep.py --emulator firestore
	$(BIN)/python bench/bench_sweep.py --emulator datastore --latency-ms 60 --only $(LATENCY_APPROACHES)
	$(BIN)/python bench/bench_sweep.py --emulator firestore --latency-ms 60 --only $(LATENCY_APPROACHES)
	$(BIN)/python bench/peak_memory.py
	$(BIN)/python bench/soak.py

bench-memory: $(STAMP)
	$(BIN)/python bench/peak_memory.py

# Deletes/s of each expiry encoding against int epoch seconds, and the cost of
# --with-descendants (0, 1 or 5 children per session), on both emulators. A sweep that fails
# on the first emulator fails the target, after the second has run too.
bench-encodings: $(STAMP)
	$(BIN)/python bench/bench_encodings.py --emulator datastore; status=$$?; \
	$(BIN)/python bench/bench_encodings.py --emulator firestore && exit $$status

# Sessions written, refreshed and swept on a 15 s schedule for 6 minutes, then drained: the delay
# after expiry + grace, live sessions lost, the backlog over time; writes docs/soak.png. About
# 8.5 minutes. See docs/retention.md.
soak: $(STAMP)
	$(BIN)/python bench/soak.py
