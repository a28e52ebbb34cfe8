VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled

.PHONY: install test test-backfill-week lint demo bench bench-control bench-quality bench-incremental bench-postgres clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -rs -p no:cacheprovider --durations=15

test-backfill-week: install  # the backfill test over 7 days instead of 2 (about 18 minutes here)
	RAYDATA_BACKFILL_DAYS=7 $(PY) -m pytest -q -p no:cacheprovider tests/dags/test_backfill.py

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

demo: install
	bash scripts/demo.sh

bench: install
	$(PY) benchmarks/daily_pipeline.py

bench-control: install  # both transports: task overhead, a 7-day backfill each, slots (about 19 minutes here)
	$(PY) benchmarks/control_plane.py

bench-quality: install
	$(PY) benchmarks/quality_checks.py --scale 1 --repeats 3

bench-incremental: install
	$(PY) benchmarks/incremental.py --orders-per-day 20000 --history-days 1 30 --repeats 3

bench-postgres: install  # about 25 minutes here
	$(PY) benchmarks/postgres_load.py --scale 1 --to-sql-rows 1000000 --repeats 5

clean:
	rm -rf .demo .bench build *.egg-info
