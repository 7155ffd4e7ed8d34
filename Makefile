VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The oldest supported transformers gets its own venv: requirements.txt with its transformers pin swapped for
# requirements-oldest.txt's (pip refuses two pins of one package, so the newest pin is filtered out here).
OLDEST_VENV ?= .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_STAMP := $(OLDEST_VENV)/.installed
# lmms-eval's environment: requirements.txt (its av line replaced), requirements-eval.txt, then lmms-eval and the
# repo's lmms-eval package without their declared dependencies (see requirements-eval.txt for why).
EVAL_VENV ?= .venv-eval
EVAL_PY := $(EVAL_VENV)/bin/python
EVAL_STAMP := $(EVAL_VENV)/.installed
TEST_ENV := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1

.PHONY: venv venv-oldest eval-venv test test-all test-oldest test-eval demo clean app app-deps test-app bench-app

venv: $(STAMP)

$(STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

venv-oldest: $(OLDEST_STAMP)

$(OLDEST_STAMP): requirements.txt requirements-oldest.txt
	python3 -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install -q --upgrade pip
	grep -v '^transformers==' requirements.txt > $(OLDEST_VENV)/requirements-newest-unpinned.txt
	$(OLDEST_PY) -m pip install -q -r $(OLDEST_VENV)/requirements-newest-unpinned.txt -r requirements-oldest.txt
	touch $(OLDEST_STAMP)

eval-venv: $(EVAL_STAMP)

$(EVAL_STAMP): requirements.txt requirements-eval.txt integrations/lmms_eval/pyproject.toml
	python3 -m venv $(EVAL_VENV)
	$(EVAL_PY) -m pip install -q --upgrade pip
	grep -v '^av[=<>]' requirements.txt > $(EVAL_VENV)/requirements-without-av.txt
	grep -v '^lmms-eval==' requirements-eval.txt > $(EVAL_VENV)/requirements-eval-deps.txt
	$(EVAL_PY) -m pip install -q -r $(EVAL_VENV)/requirements-without-av.txt -r $(EVAL_VENV)/requirements-eval-deps.txt
	$(EVAL_PY) -m pip install -q --no-deps $$(grep '^lmms-eval==' requirements-eval.txt) -e integrations/lmms_eval
	touch $(EVAL_STAMP)

# The quick loop on the newest supported transformers (requirements.txt): unit and equivalence tests, without the
# tests marked slow (they start processes: scripts, torchrun, fresh interpreters, Trainer runs).
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow" tests

# Everything, slow tests included, on the newest supported transformers.
test-all: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q tests

# Everything on the oldest supported transformers (requirements-oldest.txt).
test-oldest: $(OLDEST_STAMP)
	$(TEST_ENV) $(OLDEST_PY) -m pytest -q tests

# Video-XL through lmms-eval (integrations/lmms_eval/tests), and the repo's video decoding tests on the PyAV
# lmms-eval allows.
test-eval: $(EVAL_STAMP)
	$(TEST_ENV) HF_DATASETS_OFFLINE=1 $(EVAL_PY) -m pytest -q integrations/lmms_eval/tests tests/test_media_files.py \
		tests/test_media_inputs.py tests/test_processor.py

# The browser app (app.py): its Python packages (requirements-app.txt) in .venv, and Debian's Chromium for its test
# (Playwright drives /usr/bin/chromium; Playwright's own browser download is not used).
APP_STAMP := $(VENV)/.app-installed
CHROMIUM := /usr/bin/chromium

app-deps: $(APP_STAMP) $(CHROMIUM)

$(APP_STAMP): $(STAMP) requirements-app.txt
	$(PY) -m pip install -q -r requirements-app.txt
	touch $(APP_STAMP)

$(CHROMIUM):
	apt-get update -q
	apt-get install -y -q chromium

app: $(APP_STAMP)
	HF_HUB_OFFLINE=1 $(PY) app.py

# app.py in headless Chromium (tests_app/: apart from `tests`, whose venvs have no Gradio).
test-app: app-deps
	$(TEST_ENV) $(PY) -m pytest -q tests_app

bench-app: $(APP_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.app_latency

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m demo.run

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(EVAL_VENV)
