# The two commands a newcomer needs:  `make run`  and  `make test`.
# Both install whatever is missing (the Debian packages of TOOLS below, a
# virtualenv with the project and its test dependencies) before they start.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint bench setup tools clean

run: setup
	$(BIN)/statestore serve

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check statestore api tests benchmarks
	$(BIN)/ruff format --check statestore api tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_store.py

setup: tools $(VENV)/.installed

# Every command (or file) the service, the tests and the benchmarks run, with
# the Debian package that ships it. Debian's etcd-server has no etcdctl: that is
# etcd-client. ZooKeeper, the peer the benchmarks compare against (and whose
# protocol a test checks), has no command on PATH: its server runs from the jar.
TOOLS = etcd:etcd-server etcdctl:etcd-client java:openjdk-17-jdk-headless \
        javac:openjdk-17-jdk-headless /usr/share/java/zookeeper.jar:zookeeper

tools:
	@missing=""; for t in $(TOOLS); do \
	  command -v "$${t%%:*}" >/dev/null 2>&1 || [ -e "$${t%%:*}" ] || missing="$$missing $${t#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .statestore .pytest_cache .hypothesis
