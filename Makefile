# The two commands a newcomer needs:  `make run`  and  `make test`.
# Both install whatever is missing (etcd from Debian's etcd-server package,
# a virtualenv with the project and its test dependencies) before they start.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint bench setup tools bench-tools clean

run: setup
	$(BIN)/statestore serve

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check statestore api tests benchmarks
	$(BIN)/ruff format --check statestore api tests benchmarks

# The store benchmark also runs a ZooKeeper peer (benchmarks/zk_peer.py): Debian's
# zookeeper package and the `bench` extra (kazoo), installed only for it.
bench: setup bench-tools $(VENV)/.bench-installed
	$(BIN)/python benchmarks/bench_store.py

setup: tools $(VENV)/.installed

# Every command the service or the tests run, with the Debian package that
# ships it. Debian's etcd-server has no etcdctl: that is etcd-client.
TOOLS = etcd:etcd-server etcdctl:etcd-client

# What the benchmarks run besides: a command or a file (ZooKeeper has no command
# on PATH; its server is started from the jar), with its Debian package.
BENCH_TOOLS = java:default-jre-headless /usr/share/java/zookeeper.jar:zookeeper

# $(call apt_missing,TOOLS): apt-get install the packages of the tools not found.
define apt_missing
	@missing=""; for t in $(1); do \
	  command -v "$${t%%:*}" >/dev/null 2>&1 || [ -e "$${t%%:*}" ] || missing="$$missing $${t#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
endef

tools:
	$(call apt_missing,$(TOOLS))

bench-tools:
	$(call apt_missing,$(BENCH_TOOLS))

$(VENV)/.installed: pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

clean:
	rm -rf $(VENV) .statestore .pytest_cache .hypothesis
