# raymia: `make demo` runs the main job on the embedded default, `make test` the suite.
# Both bootstrap .venv from pyproject.toml on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export PYTHONUNBUFFERED := 1

.PHONY: install demo attack-sweep train serve search filter study red-team whitebox-panel threat-panel test test-unit test-integration bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) jobs/alpha_sweep.py $(ARGS)

# the demo's alpha sweep with its attack dimension: the same rows also attacked by EOT, black-box NES and
# label-only (alpha still chosen on the white-box attack; reuses the demo's models and white-box rows)
attack-sweep: install
	$(PY) jobs/alpha_sweep.py --set "sweep.attacks=[whitebox,eot,nes,label]" $(ARGS)

train: install
	$(PY) jobs/train.py $(ARGS)

# the defended model behind the per-client filter on http://127.0.0.1:8000 (trains and sweeps first if needed)
serve: demo
	$(VENV)/bin/serve run serve.app $(SERVE_ARGS)

search: install
	$(PY) jobs/defense_search.py $(ARGS)

filter: install
	$(PY) jobs/filter_sweep.py $(ARGS)

study: install
	$(PY) jobs/study.py $(ARGS)

red-team: install
	$(PY) jobs/red_team.py $(ARGS)

whitebox-panel: install
	$(PY) jobs/whitebox_panel.py $(ARGS)

# the query attacks vs query budget: undefended, dummy defense at its deployed alpha, filters, both (needs `make demo`)
threat-panel: install
	$(PY) jobs/threat_panel.py $(ARGS)

# speed benchmarks whose numbers are in docs/benchmarks.md (bench/bench_serve.py needs `make demo` first)
bench: install
	$(PY) bench/bench_attack.py
	$(PY) bench/bench_ssim.py
	$(PY) bench/bench_filters.py --no-docs
	$(PY) bench/bench_state_bound.py

test: install
	mkdir -p .tmp
	TMPDIR=$(CURDIR)/.tmp RAY_TMPDIR=$(CURDIR)/.tmp $(PY) -m pytest -q $(ARGS)

# the suite's two halves: no Ray (fast) / Ray, HTTP and whole jobs
test-unit: install
	$(MAKE) test ARGS="-m unit $(ARGS)"

test-integration: install
	$(MAKE) test ARGS="-m integration $(ARGS)"

clean:
	rm -rf .tmp .pytest_cache
