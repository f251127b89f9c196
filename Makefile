# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: setup wheel demo test test-all test-hostile test-runtime-profile bench bench-camera bench-fleet bench-fleet-shards bench-fleet-hosts lint clean mosquitto chromium datasets tune accuracy accuracy-long bench-robustness arm-sysroot bench-cross-arch bench-camera-grid

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first: any other torch spec pulls CUDA wheels; the pin takes the local CPU build.
# `.[dev]` includes `[train]` (torch, exporter); a device installs `.` or `.[runtime]` only.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages: apt-get as root, through sudo for another user (a Pi's `pi`); with
# neither, deploy/apt-install.sh prints the command to run and exits 2.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
	  sh deploy/apt-install.sh mosquitto

# Headless Chromium for the slow dashboard test (tests/test_metrics_dashboard.py). Not part
# of `setup`: only `make test-all` uses it, and where it cannot be installed (no root) that
# one test skips and says so instead of failing the run.
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	  sh deploy/apt-install.sh chromium || \
	  echo "chromium not installed: the dashboard's browser test will skip"

# Fashion-MNIST (MIT) for `--dataset fmnist`: Debian ships it, so nothing is downloaded at run time.
FMNIST_FILE := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
datasets:
	@test -f $(FMNIST_FILE) || sh deploy/apt-install.sh dataset-fashion-mnist

setup: $(STAMP) mosquitto datasets

# The wheel (and sdist) a Raspberry Pi or Jetson installs: `make wheel`, then copy
# dist/fedcoe_edge-VERSION-py3-none-any.whl to the device (docs/deploy.md, "Getting the
# package onto a device"). The wheel is built from the sdist, so both carry every file.
wheel: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

# The whole deployment on one machine (benchmarks/demo.py): broker, coordinator, 6 agents, 10
# rounds, a cold device, each device's int8 bundle, and one bundle scored without torch.
demo: setup
	$(BIN)/fedcoe demo --out runs/demo --json runs/demo/demo.json

# `make test` (goal: 5 min on 2 cores): every test but the `slow` ones, one pytest-xdist
# worker per core; a file whose tests share a module-scoped fixture stays on one worker and
# the longest files start first (tests/conftest.py). `make test-all` (what CI runs): `make
# test`, then every `slow` test one at a time: the multi-process deployments (quickstart,
# camera and sharded `fedcoe init` deployments, demo, shard processes, fleet runs, examples'
# federation, reconnect backoff, operator walk-through), the hostile suite, the Flower and
# Ray engines, the fresh-venv runtime profile and the browser dashboard. They take tens of
# seconds to minutes each and measure daemons under sustained load, which a test beside them
# on the other core would distort (README, "Tests").
PYTEST_PAR := -n auto --dist loadgroup
test: setup
	$(BIN)/python -m pytest -q $(PYTEST_PAR)

test-all: test chromium
	$(BIN)/python -m pytest -q -s -m slow

# The slow part of the hostile suite (real broker + daemon processes under a short and a
# sustained attack, a coordinator killed mid-upload, 1,000 slowloris identities against the
# reassembly budget); `make test` runs only the unit tests. `-s` prints each test's figures.
test-hostile: setup
	$(BIN)/python -m pytest -q -s -m slow tests/test_hostile.py tests/test_slowloris.py

# The runtime install profile in a fresh venv (pip from the package index): torch absent,
# `fedcoe predict` classifies with a signed bundle, a train-role agent refuses in one line.
test-runtime-profile: setup
	$(BIN)/python -m pytest -q -m slow tests/test_runtime_profile.py

bench: setup
	$(BIN)/python -m pytest benchmarks -m bench --benchmark-enable --benchmark-only \
	  --benchmark-json=benchmarks/results/latency.json -p no:cacheprovider
	$(BIN)/python -m benchmarks.report

# The trained camera bundle's accuracy: V3-Small trunk pretrained on a public Fashion-MNIST
# slice, frozen in a FedCoE federation at 64x64, then torch fp32 / ONNX fp32 / ONNX int8 top-1
# on the official test split (docs/benchmarks.md, "Trained camera bundle"); ~3 min unloaded, 1 thread.
bench-camera: setup
	$(BIN)/python -m benchmarks.camera_accuracy

# The deployed setting's grid: frozen pretrained V3-Small trunk, one camera per client, FedCoE
# and every baseline on the trunk's features, tuned on validation, 3 seeds (docs/benchmarks.md,
# "Camera grid: the deployed setting"); resumes from its caches; hours on one core per setting.
bench-camera-grid: setup
	$(BIN)/python -m benchmarks.camera_grid --jobs 2

# The same bundle on x86 and ARM: int8 and fp32 top-1 agreement between this host and
# Cortex-A72 / A76 under user-mode qemu (docs/bundle.md, "Same answers on every CPU"). Needs
# root; `arm-sysroot` unpacks Debian's arm64 python and the aarch64 wheels into
# /opt/fedcoe-arm64 and registers no binfmt handler. Run `make bench-camera` first.
arm-sysroot: setup
	PY=$(BIN)/python benchmarks/arm_sysroot.sh

bench-cross-arch: arm-sysroot
	$(BIN)/python -m benchmarks.cross_arch
	$(BIN)/python -m benchmarks.activations_cost

# Simulated devices on the real protocol against one real coordinator and a Mosquitto with
# the deploy template's limits (docs/benchmarks.md, "Fleet"); minutes on two cores.
FLEET_SIZES ?= 100 500 1000 2000 5000
bench-fleet: setup
	$(BIN)/python -m benchmarks.fleet --devices $(FLEET_SIZES) --rounds 2 --procs 2 \
	  --json benchmarks/results/fleet.json --md benchmarks/results/fleet.md \
	  --png benchmarks/results/fleet.png

# The same fleet past one coordinator: a leader and 3 shard aggregator processes beside the
# single coordinator, same sizes, same run (docs/daemons.md, "Past one machine").
bench-fleet-shards: setup
	$(BIN)/python -m benchmarks.fleet --devices 1000 5000 --rounds 2 --procs 2 --shards 0 3 \
	  --timeout-s 600 --json benchmarks/results/fleet_shards.json \
	  --md benchmarks/results/fleet_shards.md --png benchmarks/results/fleet_shards.png

# Past one host: a leader host and 4 shard hosts as network namespaces, each shard's broker
# bridged to the leader's; LAN, WAN relay and a bridge outage (root for `ip netns`;
# docs/benchmarks.md, "Fleet past one host").
bench-fleet-hosts: setup
	$(BIN)/python -m benchmarks.fleet_hosts --devices 100 1000 5000 --shards 4 --rounds 2 \
	  --links direct wan outage --json benchmarks/results/fleet_hosts.json \
	  --md benchmarks/results/fleet_hosts.md --png benchmarks/results/fleet_hosts.png

# Knobs of every algorithm on validation splits (same budget each), then the test-split grid;
# both resume from their caches under benchmarks/results/.
tune: setup
	$(BIN)/python -m benchmarks.tune --jobs 2

accuracy: setup
	$(BIN)/python -m benchmarks.accuracy --jobs 2

# The convergence check: FedCoE and every baseline at 60 rounds on the Fashion-MNIST settings
# (the main grid stops at 30); about 3 CPU h per seed, resumed from its cache. Writes
# results/long60/. `make accuracy-long LONG_SEEDS=0,1` reports the seeds finished so far.
LONG_SEEDS ?= 0,1,2
accuracy-long: setup
	$(BIN)/python -m benchmarks.accuracy --jobs 2 --rounds 60 --seeds $(LONG_SEEDS) --ablations '' \
	  --settings fmnist-dir0.1,fmnist-dir0.5,fmnist-shards2 \
	  --algorithms fedcoe,fedavg,fedprox,local,fedavg-ft,ditto,fedrep,mixture \
	  --out benchmarks/results/long60 --cache benchmarks/results/long60/accuracy_cache.jsonl

# Poisoned updates (scaled, sign-flipped, noise, label flip, lying num_samples) from 1 and 2
# of 10 devices against each defence, FedCoE and FedAvg (docs/benchmarks.md, "Robustness");
# about 35 min on one core, resumed from its cache; the report covers what finished.
bench-robustness: setup
	$(BIN)/python -m benchmarks.robustness --budget-min 35

# ruff over everything; mypy over the packages and examples ([tool.mypy] files in pyproject.toml)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache dist build
