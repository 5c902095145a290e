# The two commands a new user runs on a fresh clone (each does its own set-up).
.PHONY: demo test setup lint
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
setup:
	bash scripts/setup.sh
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
