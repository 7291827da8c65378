# The two commands of the README:
#   make demo   -- a real deploy to private Postfix + Dovecot via Redis + a worker
#   make test   -- ruff, the layer contracts, mypy and the whole test suite against real
#                  services, on this Debian and on Debian 13 (a cached root)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-here test-faults test-platforms test-trixie test-trixie-faults test-exim test-as-trixie demo lint typecheck deps bootstrap bench bench-sni clean faults model install wheel

# What the bootstrap installs: everything the tests use, or (make demo) the daemons alone.
BOOTSTRAP_FOR ?= test
bootstrap:
	@sh scripts/bootstrap.sh $(BOOTSTRAP_FOR)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

deps: bootstrap $(STAMP)

lint: deps     ## ruff, and the layer contracts of docs/architecture.md (import-linter, pyproject.toml)
	$(BIN)/ruff check mailtls_tasks tests bench workers demo
	$(BIN)/lint-imports --no-cache

typecheck: deps
	$(BIN)/mypy mailtls_tasks

# Six lanes, each under 10 minutes on 2 cores: the suite on this machine's Debian (12
# here), the faults (the matrix's slice of strace-injected kills and errors, a Redis master
# SIGKILLed under Sentinel, the demo stopped by signals), the platform suites
# (a real systemd in an nspawn machine, podman containers), then the real-daemon suites
# on Debian 13 in a cached root (scripts/trixie-root.sh). On a Debian 13 machine the
# first lane is already that. The faults have a lane of their own on each Debian (with
# them, test-here took 9:35 and test-trixie 10:14 on clean runs). Then Exim (tests/exim): 4.96 and 4.98, each in a Debian root of its own (Exim and Postfix
# conflict as packages), about a minute each.
PLATFORM_SUITES := tests/compose tests/systemd
FAULT_SUITES := tests/faults
ROOT_SUITES := tests/exim
test: lint typecheck test-here test-faults test-platforms test-trixie test-trixie-faults test-exim

test-here: deps
	@$(BIN)/pytest -q -ra --durations=10 tests $(foreach s,$(PLATFORM_SUITES) $(FAULT_SUITES) $(ROOT_SUITES),--ignore=$(s)); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests -- that is a failure here"; exit 1; fi; \
	exit $$rc

test-faults: deps   ## the fault matrix's slice on this machine (make faults: every point)
	@$(BIN)/pytest -q -ra --durations=5 $(FAULT_SUITES); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no fault tests -- that is a failure here"; exit 1; fi; \
	exit $$rc

test-platforms: deps   ## systemd (nspawn) and containers (podman)
	@$(BIN)/pytest -q -ra --durations=5 $(PLATFORM_SUITES); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no platform tests -- that is a failure here"; exit 1; fi; \
	exit $$rc

test-trixie: deps   ## the Debian 13 lane alone: Postfix 3.10, Dovecot 2.4, Redis 8, Python 3.13
	@if grep -q '^VERSION_ID="13"' /etc/os-release 2>/dev/null; then \
	    echo "make test-trixie: this machine is Debian 13, test-here was that lane"; \
	else sh scripts/trixie-lane.sh; fi

test-trixie-faults: deps   ## the fault suites on Debian 13
	@if grep -q '^VERSION_ID="13"' /etc/os-release 2>/dev/null; then \
	    echo "make test-trixie-faults: this machine is Debian 13, test-faults was that lane"; \
	else sh scripts/root-lane.sh sh -c 'exec .venv/bin/pytest -q -ra -p no:cacheprovider --durations=5 $(FAULT_SUITES)'; fi

test-exim: deps   ## Exim 4.96 (Debian 12) and 4.98 (Debian 13), each installed by apt in a root of its own
	@sh scripts/root-lane.sh --root exim-bookworm && sh scripts/root-lane.sh --root exim-trixie

# `make test` as a Debian 13 machine runs it (its bootstrap, both lanes' suites as one, the
# systemd and compose suites), in a throw-away copy of the trixie root: not part of
# `make test` (it would run every suite a second time), a check of the Debian 13 path.
test-as-trixie:
	sh scripts/trixie-lane.sh --as-host make test

demo: BOOTSTRAP_FOR = demo
demo: deps
	$(BIN)/python -m demo $(DEMO_ARGS)

# The long sweeps (make test runs a representative slice of each):
faults: deps   ## every N of every injected fault, both modes; writes faults-report.md
	$(BIN)/python -m tests.faults --level full --out faults-report.md
	MAILTLS_FAULTS=full $(BIN)/pytest -q tests/faults/test_sni_faults.py

model: deps    ## the protocol model test and the batch interleavings with many more examples
	MAILTLS_MODEL_EXAMPLES=2000 MAILTLS_MODEL_STEPS=50 $(BIN)/pytest -q -p no:logging --timeout 3600 tests/unit/test_protocol_model.py
	MAILTLS_INTERLEAVINGS=400 $(BIN)/pytest -q -p no:logging --timeout 3600 tests/local/test_batch_interleaving.py

bench: deps   ## the deploy's costs (python -m bench), then the SNI host's (bench-sni); exit by both
	rc=0; $(BIN)/python -m bench || rc=$$?; $(BIN)/python -m bench.sni || rc=$$?; exit $$rc

bench-sni: deps   ## a 1,000-name SNI host against a 10-name one, a batch of 100, a worker's PSS
	$(BIN)/python -m bench.sni

# Onto a mail host (Debian 12 refuses `pip install` into the system Python): its own
# venv under $(PREFIX), the command linked where the systemd units expect it.
#   make install                 # /opt/mailtls + /usr/local/bin/mailtls, with Flower
#   make install SRC=dist/mailtls_tasks-0.1.0-py3-none-any.whl   # from a built wheel
PREFIX ?= /opt/mailtls
BINDIR ?= /usr/local/bin
SRC    ?= .
# The system's Python, not one under /root (pyenv): the Flower unit's dynamic user must run it.
INSTALL_PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
# umask 022 on every line: the venv must be readable by the Flower unit's dynamic user,
# whatever root's own umask is.
install:
	@$(INSTALL_PYTHON) -c 'import venv, ensurepip' 2>/dev/null || apt-get install -y -qq python3-venv
	@umask 022; test -x $(PREFIX)/bin/python || $(INSTALL_PYTHON) -m venv $(PREFIX)
	umask 022; $(PREFIX)/bin/pip install -q --upgrade pip
	umask 022; $(PREFIX)/bin/pip install -q '$(SRC)[flower]'
	@mkdir -p $(BINDIR)
	ln -sfn $(PREFIX)/bin/mailtls $(BINDIR)/mailtls
	@$(BINDIR)/mailtls --version

wheel:         ## dist/mailtls_tasks-*.whl (nothing else installed: fine on a build or mail host)
	$(INSTALL_PYTHON) -m pip wheel --no-deps -w dist .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist build
