# The two commands a newcomer needs:  `make run`  and  `make test`.
# Both install whatever is missing (the Debian packages of TOOLS below, a
# virtualenv with the project and its test dependencies) before they start.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint bench setup tools clean flink-plugin flink-dist

run: setup
	$(BIN)/statestore serve

test: setup flink-plugin
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
# javac and jar build the Flink HA plugin (integrations/flink).
TOOLS = etcd:etcd-server etcdctl:etcd-client java:openjdk-17-jdk-headless \
        javac:openjdk-17-jdk-headless jar:openjdk-17-jdk-headless \
        /usr/share/java/zookeeper.jar:zookeeper

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

# --- Flink HA plugin (integrations/flink) -----------------------------------
# Flink 2.3.0 comes from PyPI (no Maven Central): apache-flink-libraries ships
# lib/*.jar, apache-flink ships bin/ and conf/. The wheels are downloaded once
# into FLINK_CACHE and unpacked into a Flink home there ($(FLINK_HOME)); a
# second run reuses both. Nothing is installed into the venv.
FLINK_VERSION ?= 2.3.0
FLINK_CACHE   ?= $(HOME)/.cache/statestore/flink-$(FLINK_VERSION)
FLINK_HOME    := $(FLINK_CACHE)/home
FLINK_DIST    := $(FLINK_HOME)/lib/flink-dist-$(FLINK_VERSION).jar
FLINK_BUILD   := integrations/flink/build
FLINK_PLUGIN  := $(FLINK_BUILD)/statestore-flink-ha.jar
FLINK_JOB     := $(FLINK_BUILD)/keyed-count-job.jar
FLINK_SRC     := $(shell find integrations/flink/src/main -name '*.java' 2>/dev/null)
FLINK_JOB_SRC := $(shell find integrations/flink/src/job -name '*.java' 2>/dev/null)

flink-dist: tools $(FLINK_DIST)

flink-plugin: tools $(FLINK_PLUGIN) $(FLINK_JOB)

# Order-only on the venv (its pip downloads the wheels): a newer venv, as in a
# fresh clone or worktree, must not unpack the cached Flink home again under a
# Flink that is running from it.
$(FLINK_DIST): | $(VENV)/.installed
	mkdir -p $(FLINK_CACHE)/wheels
	ls $(FLINK_CACHE)/wheels/apache_flink-$(FLINK_VERSION)-*.whl $(FLINK_CACHE)/wheels/apache_flink_libraries-$(FLINK_VERSION)-*.whl >/dev/null 2>&1 || \
	  $(BIN)/python -m pip download -q --no-deps -d $(FLINK_CACHE)/wheels \
	    apache-flink==$(FLINK_VERSION) apache-flink-libraries==$(FLINK_VERSION)
	rm -rf $(FLINK_CACHE)/unpacked $(FLINK_HOME).tmp
	mkdir -p $(FLINK_CACHE)/unpacked $(FLINK_HOME).tmp
	for w in $(FLINK_CACHE)/wheels/*.whl; do $(BIN)/python -m zipfile -e "$$w" $(FLINK_CACHE)/unpacked; done
	cp -r $(FLINK_CACHE)/unpacked/pyflink/bin $(FLINK_CACHE)/unpacked/pyflink/conf $(FLINK_CACHE)/unpacked/pyflink/lib $(FLINK_HOME).tmp/
	rm -f $(FLINK_HOME).tmp/bin/find_flink_home.py
	chmod +x $(FLINK_HOME).tmp/bin/*.sh $(FLINK_HOME).tmp/bin/flink
	rm -rf $(FLINK_CACHE)/unpacked $(FLINK_HOME)
	mv $(FLINK_HOME).tmp $(FLINK_HOME)

$(FLINK_PLUGIN): $(FLINK_DIST) $(FLINK_SRC)
	rm -rf $(FLINK_BUILD)/classes && mkdir -p $(FLINK_BUILD)/classes
	javac --release 17 -nowarn -Xlint:-options -cp '$(FLINK_HOME)/lib/*' -d $(FLINK_BUILD)/classes $(FLINK_SRC)
	jar cf $@ -C $(FLINK_BUILD)/classes .

$(FLINK_JOB): $(FLINK_DIST) $(FLINK_JOB_SRC)
	rm -rf $(FLINK_BUILD)/job-classes && mkdir -p $(FLINK_BUILD)/job-classes
	javac --release 17 -nowarn -Xlint:-options -cp '$(FLINK_HOME)/lib/*' -d $(FLINK_BUILD)/job-classes $(FLINK_JOB_SRC)
	jar cfe $@ io.statestore.flink.job.KeyedCountJob -C $(FLINK_BUILD)/job-classes .
