PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# pytest exits 5 when it collects nothing: a suite that vanished is a failure, said plainly.
test: $(STAMP)
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: tests/ is missing or empty"; exit 1; fi; exit $$rc

# The default run (a small CvT on scikit-learn's digits, on the CPU) into its own folder, replaced on each demo, then
# evaluated on its held-out split.
demo: $(STAMP)
	$(BIN)/cvt train --output runs/demo --overwrite
	$(BIN)/cvt eval --checkpoint runs/demo/best.pth

clean:
	rm -rf $(VENV) runs build src/*.egg-info
