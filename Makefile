# The README's two commands: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup demo test test-fast bench clean

setup:
	bash scripts/bootstrap.sh

demo: setup
	.venv/bin/mixln-train configs/tiny.yaml train.out_dir=runs/demo

test: setup
	.venv/bin/python -m pytest -q tests

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" tests

bench: setup
	.venv/bin/mixln-bench hf

clean:
	rm -rf runs .cache .pytest_cache build *.egg-info
