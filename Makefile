# Two commands do all the set-up on a fresh machine:
#   make train   # creates .venv on first use, then trains configs/cifar100_s.py
#   make test    # creates .venv on first use, then runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/cifar100_s.py
WORKDIR ?= workdirs/$(basename $(notdir $(CONFIG)))
TCMALLOC = $(firstword $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4))

.PHONY: train test setup allocator

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed allocator

# tcmalloc makes JAX on CPU much faster (fewer page faults); best effort, never fatal.
allocator:
	@if [ -z "$(TCMALLOC)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1)) \
	  || echo "tcmalloc not installed; using the system allocator"; fi

train: setup
	$(PY) train.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: setup
	LD_PRELOAD="$(firstword $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4))" \
	  $(PY) -m pytest -q tests
