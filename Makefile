# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test bench lint clean mosquitto

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first: any other torch spec pulls CUDA wheels; the pin takes the local CPU build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto)

setup: $(STAMP) mosquitto

demo: setup
	$(BIN)/fedcoe simulate --dataset digits --partition dirichlet --alpha 0.1 --clients 20 --new-clients 4 \
	  --rounds 30 --algorithms fedcoe,fedavg --seeds 0 --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pytest benchmarks -m bench --benchmark-enable --benchmark-only \
	  --benchmark-json=benchmarks/results/latency.json -p no:cacheprovider
	$(BIN)/python -m benchmarks.report

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
