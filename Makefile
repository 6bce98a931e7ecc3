# The README's commands. `make demo` and `make test` set everything up on a fresh machine first.
PY := .venv/bin/python
PIP := .venv/bin/pip
TORCH_SPEC ?= torch==2.14.1
# one stamp per torch spec: `TORCH_SPEC=torch==2.11.0 make test` installs that torch even after a first `make demo`
STAMP := .venv/.lmobj-deps-$(shell printf '%s' '$(TORCH_SPEC)' | tr -c 'A-Za-z0-9.' '_')

.PHONY: demo test build lint bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)" numpy ninja wheel setuptools pytest pytest-benchmark ruff matplotlib "triton>=3.6"
	@# Triton 3.6's interpreter (torch 2.11's Triton) needs NumPy < 2.4 to run the Triton tests on the CPU
	if $(PY) -c "import triton, sys; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) >= (3, 7))"; \
	  then $(PIP) install --quiet "numpy<2.4"; fi
	touch $@

# Incremental (ninja) in-place build of lmobj_kernels._C, then the editable install that puts `lmobj` on PATH.
build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace
	test -f .venv/.lmobj-editable || (LMOBJ_SKIP_EXT=1 $(PIP) install --quiet --no-build-isolation --no-deps -e . && touch .venv/.lmobj-editable)

# Every op against its reference, then GPT, BERT and T5 trained side by side (a few minutes on a 2-core CPU).
demo: build
	.venv/bin/lmobj verify
	.venv/bin/lmobj train --objective all

# The oldest Triton we support (a GPU machine's), beside the installed one: tests/test_triton_resources.py compiles
# every kernel with both for the GPU architectures, so a kernel only the old compiler refuses fails here.
OLDEST_TRITON := .venv/triton-3.6
$(OLDEST_TRITON): $(STAMP)
	$(PIP) install --quiet --no-deps --upgrade --target $(OLDEST_TRITON) triton==3.6.0
	touch $@

# The newest Triton release, which a CPU-only torch (whose wheel pins no Triton) gets from `pip install triton`: the
# Triton tests run again with it, interpreted, and lower every kernel with it for the GPU architectures (3.9's
# interpreter refused a mask the others took).
NEWEST_TRITON := .venv/triton-3.9
$(NEWEST_TRITON): $(STAMP)
	$(PIP) install --quiet --no-deps --upgrade --target $(NEWEST_TRITON) triton==3.9.0
	touch $@

test: build lint $(OLDEST_TRITON) $(NEWEST_TRITON)
	LMOBJ_OLDEST_TRITON=$(OLDEST_TRITON) TRITON_INTERPRET=1 $(PY) -m pytest -q tests
	PYTHONPATH=$(NEWEST_TRITON) TRITON_INTERPRET=1 $(PY) -m pytest -q tests -k triton

lint: $(STAMP)
	.venv/bin/ruff check .

bench: build
	.venv/bin/lmobj bench

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build lmobj_kernels/_C*.so .venv/.lmobj-editable
