# Two entry points: `make demo` (the main job on the embedded procedural dataset) and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo sample test lint bench clean

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m voxdiff --preset demo --run_dir runs/demo

# 16 shapes per category from the shipped model (docs/MODEL_CARD.md), no training: samples/medium/{category}.npy/.png
# with the sampling settings stored in models/medium/ldm.pt (picked by its tune stage on held-out training shapes)
sample: $(STAMP)
	$(PY) diffusion/sample.py --ldm_ckpt_path models/medium/ldm.pt --ae_ckpt_path models/medium/ae.pt \
		--save_dir samples/medium --category all --num_samples 16 --batch_size 16 --resolution 32

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/bench_preprocess.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_ae.py
	$(PY) bench/bench_sample.py
	$(PY) bench/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
