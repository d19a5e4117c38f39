# mmctx: `make demo` and `make test` each set the environment up first.
# PYTHON is the interpreter (and so the venv) everything is installed into.
PYTHON ?= python3
export PYTHON

DEMO_DATA ?= data/demo
DEMO_WORK_DIR ?= work_dirs/demo

.PHONY: help setup data demo test clean-demo cuda-proof

help:
	@echo "make setup  - install torch (if missing), mmcv 2.1.0 with ops (cached build), the OpenMMLab stack and mmctx (-e)"
	@echo "make data   - setup + generate the synthetic demo data sets into $(DEMO_DATA)"
	@echo "make demo   - setup + the long-range-context probe: plain / SB / GE / PSI ResNet-14 trained on CPU, table + pictures in $(DEMO_WORK_DIR)"
	@echo "make test   - setup + pytest tests/"
	@echo "make cuda-proof - a fresh venv with CUDA torch 2.14.1: setup builds mmcv's CUDA ops for sm_90 here, no GPU needed (REBUILD=1: from scratch)"
	@echo "PYTHON=$(PYTHON)  (override: make test PYTHON=/path/to/venv/bin/python)"

setup:
	bash tools/setup_env.sh

data: setup
	$(PYTHON) tools/generate_demo_data.py --out $(DEMO_DATA) --seed 0

demo: setup
	$(PYTHON) tools/analysis/context_probe.py --visualize --work-dir $(DEMO_WORK_DIR) --out $(DEMO_WORK_DIR)/probe_table.md

test: setup
	$(PYTHON) -m pytest tests -v -rs --durations=25

cuda-proof:
	bash tools/gpu/setup_proof.sh

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_WORK_DIR)
