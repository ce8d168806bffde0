# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates the virtual environment (.venv) when it is missing or older than pyproject.toml.
PYTHON  ?= python3
VENV    ?= .venv
WORKDIR ?= work/demo
SIZE    ?= 2000
BIN      = $(VENV)/bin

# nothing may try the network: Prefect analytics, albumentations' update check, wandb
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export NO_ALBUMENTATIONS_UPDATE = 1
export WANDB_MODE = disabled

.PHONY: install demo test test-fast clean-demo chromium

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

# The UI screenshot test (tests/test_deployments.py) drives Debian's chromium; it is installed here
# when missing and apt-get is usable (root, as in CI), else that one test is skipped.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "make: no chromium (Debian: apt-get install -y chromium); the UI screenshot test will be skipped"

test: install chromium
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

clean-demo:
	rm -rf $(WORKDIR)
