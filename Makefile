# The two quick-start commands: `make demo` (main job on the embedded default) and `make test`.
# Both install what they need first, idempotently.
PY := .venv/bin/python

.PHONY: install install-vllm demo test
install:
	bash tools/install.sh

install-vllm:
	bash tools/install_vllm.sh

demo: install install-vllm
	$(PY) launch/train.py --config configs/demo.py

test: install install-vllm
	$(PY) -m pytest -q tests
