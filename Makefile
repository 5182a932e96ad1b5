# Two commands for a new user: `make demo` (the main job) and `make test`.
# Both create .venv on first use: torch==2.13.0 first (the CPU wheel), then this package under constraints.txt,
# so that nothing can pull a newer torch and its CUDA packages.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test bench clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(INSTALLED)

demo: $(INSTALLED)
	@echo "monai_protoseg $$($(BIN)/python -c 'import monai_protoseg; print(monai_protoseg.__version__)') is installed in $(VENV)."
	@echo "The demo bundle (bundles/protoseg_demo) does not exist yet: it is the work of issue 4."
	@echo "Until then this command only sets up the environment; 'make test' and 'make bench' exercise the core."

# pytest exits with 5 when it collects no test; that is reported, not treated as a crash.
test: $(INSTALLED)
	$(BIN)/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status

bench: $(INSTALLED)
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
