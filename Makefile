# Quick start: `make demo` (extract a store from the real demo model) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-out
DEMO_TOKENS ?= 65536

.PHONY: install demo test bench docs clean

$(BIN)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/actcache extract --model embedded:smollm2-135m --dataset embedded:stdlib-docstrings \
	  --hooks blocks.5.hook_resid_post --out $(DEMO_DIR)/smollm2.zarr \
	  --context-size 128 --n-tokens $(DEMO_TOKENS) --batch-size 16 --dtype bfloat16 --overwrite
	$(BIN)/actcache info $(DEMO_DIR)/smollm2.zarr
	$(BIN)/actcache verify $(DEMO_DIR)/smollm2.zarr --recompute 4

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_extract.py --out docs/benchmarks.md

docs: install
	$(BIN)/python tests/gen_cli_docs.py > docs/cli.md

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
