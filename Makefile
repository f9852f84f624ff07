# Two commands on a fresh machine: `make demo` runs the demo, `make test` runs every test.
# Each creates .venv and installs what it needs; torch is installed first and pinned, so that
# nothing pulls a different (CUDA) build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[demo,test,quant]' $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/surgical demo

# The suite runs in JOBS processes (pytest-xdist), one file per process at a time so that a file's
# fixtures are built once, and one torch thread each so that the processes do not oversubscribe
# the cores. `make test JOBS=1` runs the files one after another.
JOBS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(JOBS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[demo,test,quant,bench]' $(TORCH)
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/select_cost.py
	$(BIN)/python benchmarks/delta_switch.py
	$(BIN)/python benchmarks/merge_cost.py
	$(BIN)/python benchmarks/module_speed.py
	$(BIN)/python benchmarks/vision_surgical.py
	$(BIN)/python benchmarks/scale_memory.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) surgical-demo-delta .pytest_cache
