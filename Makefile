# The two commands of the README:
#   make demo   -- a real deploy to private Postfix + Dovecot via Redis + a worker
#   make test   -- ruff, mypy and the whole test suite against real services
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo lint typecheck deps bootstrap bench clean faults model

bootstrap:
	@sh scripts/bootstrap.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

deps: bootstrap $(STAMP)

lint: deps
	$(BIN)/ruff check mailtls_tasks tests bench workers demo

typecheck: deps
	$(BIN)/mypy mailtls_tasks

test: lint typecheck
	@$(BIN)/pytest -q -ra --durations=10 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests -- that is a failure here"; exit 1; fi; \
	exit $$rc

demo: deps
	$(BIN)/python -m demo $(DEMO_ARGS)

# The long sweeps (make test runs a representative slice of each):
faults: deps   ## every N of every injected fault, both modes; writes faults-report.md
	$(BIN)/python -m tests.faults --level full --out faults-report.md

model: deps    ## the protocol model test with many more examples
	MAILTLS_MODEL_EXAMPLES=2000 MAILTLS_MODEL_STEPS=50 $(BIN)/pytest -q -p no:logging tests/unit/test_protocol_model.py

bench: deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
