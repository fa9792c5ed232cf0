# Two commands do all the set-up on a fresh machine:
#   make train   # creates .venv on first use, then trains the config that fits the machine
#   make test    # creates .venv on first use, then runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# Without CONFIG=, `make train` picks the recipe that fits the machine: the 300-epoch S/4
# recipe needs a GPU/TPU (on 2 CPU cores it would take about 8 days); without one it trains
# the one-hour CPU recipe.
# The jax extra for this machine's accelerator (cuda12, cuda13, tpu; empty: CPU only).
# `make setup JAX_EXTRA=` forces the CPU build.
ifeq ($(origin JAX_EXTRA),undefined)
  JAX_EXTRA := $(shell scripts/detect_accelerator.sh)
endif
ifeq ($(origin CONFIG),undefined)
  ifneq ($(JAX_EXTRA),)
    CONFIG := configs/cifar100_s.py
    CONFIG_WHY := a GPU/TPU is present (jax[$(JAX_EXTRA)])
  else
    CONFIG := configs/cifar100_cpu_hour.py
    CONFIG_WHY := no GPU/TPU device in /dev: the S/4 recipe would take days on CPU
  endif
else
  CONFIG_WHY := CONFIG= given
endif
WORKDIR ?= workdirs/$(basename $(notdir $(CONFIG)))
comma := ,
TCMALLOC = $(firstword $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4))

.PHONY: train test setup allocator

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test$(if $(JAX_EXTRA),$(comma)$(JAX_EXTRA))]"
	echo "$(or $(JAX_EXTRA),cpu)" > $(VENV)/.jax_build
	touch $@

# A .venv made before the accelerator was visible gets its jax build here.
setup: $(VENV)/.installed allocator
	@if [ -n "$(JAX_EXTRA)" ] && [ "$$(cat $(VENV)/.jax_build 2>/dev/null)" != "$(JAX_EXTRA)" ]; then \
	  echo "installing jax[$(JAX_EXTRA)] for this machine's accelerator"; \
	  $(PY) -m pip install -q -e ".[$(JAX_EXTRA)]" && echo "$(JAX_EXTRA)" > $(VENV)/.jax_build; fi

# tcmalloc makes JAX on CPU much faster (fewer page faults); best effort, never fatal.
allocator:
	@if [ -z "$(TCMALLOC)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1)) \
	  || echo "tcmalloc not installed; using the system allocator"; fi

train: setup
	@echo "make train: $(CONFIG) ($(CONFIG_WHY)); workdir $(WORKDIR)"
	$(PY) train.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: setup
	LD_PRELOAD="$(firstword $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4))" \
	  $(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests
