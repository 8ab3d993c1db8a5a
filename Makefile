# The README's two set-up commands: `make sweep` (the main job) and `make test`.
# Both create .venv, install gpool with its dev extra and, when run as root on Debian or
# Ubuntu without the data, Debian's FashionMNIST package.
VENV ?= .venv
PY := $(VENV)/bin/python
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
CACHED_DATA := $(or $(GPOOL_DATA),$(HOME)/.cache/gpool)/FashionMNIST/raw

.PHONY: setup data sweep test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $@

data:
	@if [ ! -d $(DEBIAN_DATA) ] && [ ! -d $(CACHED_DATA) ] && [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

sweep: setup data
	$(PY) -m gpool.train -m experiment=quick pool=avg,max seed=0,1,2

test: setup data
	$(VENV)/bin/ruff check .
	$(PY) -m pytest
