# The two newcomer commands: `make demo` (the main job) and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench peers gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,hub,serve,peers,structured,cluster,eval]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m runtime.demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -rs

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

# Optional: the llama.cpp and OpenVINO rows of `make bench` (never part of `make test`). Builds llama.cpp from
# llama-cpp-python's sdist into .peers/ (about 15 minutes on 2 cores, at low priority), then the OpenVINO wheels.
peers: $(STAMP)
	nice -n 10 bash benchmarks/setup_peers.sh $(BIN)/python .peers
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[peers-build]"

# The prepared GPU check: the machine's own python3 (no venv, no installs); report in $(OUT).
OUT ?= out/gpu-check
gpu-check:
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.gpu_check --out $(OUT)

clean:
	rm -rf $(VENV) build *.egg-info
