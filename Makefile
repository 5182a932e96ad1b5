# Two commands for a new user: `make demo` (the main job) and `make test`.
# Both create .venv on first use: torch==2.13.0 first (the CPU wheel), then this package under constraints.txt,
# so that nothing can pull a newer torch and its CUDA packages.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test docs notebook bench gpu-check clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,examples,docs]"
	touch $(INSTALLED)

# The main job: the self-contained demo bundle (synthetic data, training, SA, quality estimate, report).
# Extra bundle options: make demo DEMO_ARGS="--epochs 10 --output_dir /tmp/demo"
# `monai-protoseg demo` runs: python -m monai_protoseg run --config_file bundles/protoseg_demo/configs/train.json
#     --bundle_root bundles/protoseg_demo $(DEMO_ARGS), which is python -m monai.bundle run with the cause of a
#     failure printed last and alone.
demo: $(INSTALLED)
	$(BIN)/monai-protoseg demo $(DEMO_ARGS)

# pytest exits with 5 when it collects no test; that is reported, not treated as a crash.
test: $(INSTALLED)
	$(BIN)/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status

# The API reference (Sphinx, from the docstrings, with the README as its guide), warnings as errors; offline.
# Open docs/_build/html/index.html. tests/test_docs.py builds it the same way.
docs: $(INSTALLED)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

# Runs the walkthrough notebook top to bottom in the environment's kernel and stores its outputs (figures, printed
# SA) in place, as committed (nbclient's jupyter-execute, from the extra `test`). About a minute on one CPU thread.
notebook: $(INSTALLED)
	OMP_NUM_THREADS=1 $(BIN)/jupyter-execute --inplace --kernel_name=python3 --timeout=600 notebooks/protoseg_walkthrough.ipynb

# Every benchmark in one run (about 10 minutes on 2 CPU cores); writes and prints benchmarks/RESULTS.md.
# Options: make bench BENCH_ARGS="--only core,scaling"; a smoke run: BENCH_ARGS="--quick --output /tmp/bench.md"
bench: $(INSTALLED)
	$(BIN)/python benchmarks/run_all.py --output benchmarks/RESULTS.md $(BENCH_ARGS)

# On a machine with a GPU: the CUDA tests and the core, validation (float32, autocast float16/bfloat16) and
# streaming (a pancreas-size 256x256x128 case) benchmarks on the GPU, in one table.
# GPU_CHECK_ARGS="--device cpu --size 32 --stream-shape 64,64,48 --stream-roi 32" runs the same steps on the CPU.
gpu-check: $(INSTALLED)
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
