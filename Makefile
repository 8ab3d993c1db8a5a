# The README's two set-up commands: `make sweep` (the main job) and `make test`.
# Both create .venv, install gpool with its dev extra and, when run as root on Debian or
# Ubuntu, what is missing of Debian's FashionMNIST package (and, for the tests, chromium,
# which the browser test drives; Playwright never downloads a browser of its own here).
VENV ?= .venv
PY := $(VENV)/bin/python
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
CACHED_DATA := $(or $(GPOOL_DATA),$(HOME)/.cache/gpool)/FashionMNIST/raw

APT_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
CAN_APT = [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null

.PHONY: setup data browser sweep test check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]' --config-settings editable_mode=compat
	touch $@

data:
	@if [ ! -d $(DEBIAN_DATA) ] && [ ! -d $(CACHED_DATA) ] && $(CAN_APT); then \
		$(APT_INSTALL) dataset-fashion-mnist; \
	fi

browser:
	@if ! command -v chromium >/dev/null && $(CAN_APT); then $(APT_INSTALL) chromium; fi

sweep: setup data
	$(PY) -m gpool.train -m experiment=quick pool=avg,max seed=0,1,2

test: setup data browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The quick inner loop: ruff and the tests that run in-process (no gpool, launcher or server
# processes), on both cores. `make test` runs everything.
check: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow and not process"
