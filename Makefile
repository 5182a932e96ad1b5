# Two commands for a new user: `make demo` (the main job) and `make test`.
# Both create .venv on first use: torch==2.13.0 first (the CPU wheel), then this package under constraints.txt,
# so that nothing can pull a newer torch and its CUDA packages.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test bench gpu-check clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,examples]"
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

# Every benchmark in one run (about 10 minutes on 2 CPU cores); writes and prints benchmarks/RESULTS.md.
# Options: make bench BENCH_ARGS="--only core,scaling"; a smoke run: BENCH_ARGS="--quick --output /tmp/bench.md"
bench: $(INSTALLED)
	$(BIN)/python benchmarks/run_all.py --output benchmarks/RESULTS.md $(BENCH_ARGS)

# On a machine with a GPU: the CUDA tests and the core and validation (float32, autocast float16/bfloat16)
# benchmarks on the GPU, in one table (the streaming benchmark runs on the CPU only so far).
# GPU_CHECK_ARGS="--device cpu --size 48" runs the same steps on the CPU.
gpu-check: $(INSTALLED)
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
