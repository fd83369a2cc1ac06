# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/wsilocal demo

# The tests' folders live in the clone, not in the machine's shared /tmp/pytest-of-USER: pytest clears this one
# at the start of each run, and a green run deletes it (a red one keeps it to look at).
TEST_TMP := $(CURDIR)/.pytest-tmp
# Most tests run torch on one thread, so a serial run keeps one of two cores idle: two workers took the suite from
# 11.4 to 7.8 minutes on 2 cores. Whole files go to one worker (--dist loadfile), so a module's fixtures are built
# once. `make test TEST_WORKERS=1` runs it serially.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q --durations=10 --basetemp=$(TEST_TMP) -n $(TEST_WORKERS) --dist loadfile
	rm -rf $(TEST_TMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) demo_out .pytest-tmp
