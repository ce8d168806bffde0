# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates the virtual environment (.venv) when it is missing or older than pyproject.toml.
PYTHON  ?= python3
VENV    ?= .venv
WORKDIR ?= runs/demo
SIZE    ?= 2000
BIN      = $(VENV)/bin

# nothing may try the network: Prefect analytics, albumentations' update check, wandb
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export NO_ALBUMENTATIONS_UPDATE = 1
export WANDB_MODE = disabled

.PHONY: install demo test test-fast clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --disable-pip-version-check -e '.[dev]'
	# img2dataset pulls in the obsolete `dataclasses` backport, which shadows Python 3.11's own in
	# Prefect's server process and kills it ("unexpected keyword argument 'slots'")
	$(BIN)/pip uninstall -y dataclasses
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/unclip demo --workdir $(WORKDIR) --size $(SIZE)

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

clean-demo:
	rm -rf $(WORKDIR)
