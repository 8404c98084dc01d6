# The README's two commands: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup demo test test-fast test-latest lock bench clean

setup:
	bash scripts/bootstrap.sh

demo: setup
	.venv/bin/mixln-train configs/tiny.yaml train.out_dir=runs/demo

test: setup
	.venv/bin/python -m pytest -q --durations=15 tests

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" tests

# The newest releases of every dependency (torch stays pinned) in .venv-latest, and the fast tests against them.
# MIXLN_UNLOCKED=1 tells tests/test_install.py not to expect the tested set. See docs/dependencies.md.
test-latest:
	rm -rf .venv-latest
	LATEST=1 VENV=.venv-latest bash scripts/bootstrap.sh
	MIXLN_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -m "not slow" tests

# After a green test-latest: make .venv-latest's versions the tested set (then run `make test` and commit).
lock:
	test -x .venv-latest/bin/python || { echo "make lock: run make test-latest first"; exit 2; }
	{ sed -n '/^#/p' constraints.txt; .venv-latest/bin/python -m pip freeze --all --exclude-editable | \
	  grep -v '^-e \|^#\|^megatron' | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

bench: setup
	.venv/bin/mixln-bench hf

clean:
	rm -rf runs .cache .pytest_cache build *.egg-info .venv-latest
