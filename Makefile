# Quick start: `make demo` (extract a store from the real demo model) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-out
DEMO_TOKENS ?= 65536
DEMO_HOOK ?= blocks.5.hook_resid_post

.PHONY: install demo test bench docs clean

$(BIN)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/actcache extract --model embedded:smollm2-135m --dataset embedded:stdlib-docstrings \
	  --hooks $(DEMO_HOOK) --out $(DEMO_DIR)/smollm2.zarr \
	  --context-size 128 --n-tokens $(DEMO_TOKENS) --batch-size 16 --dtype bfloat16 --overwrite
	$(BIN)/actcache info $(DEMO_DIR)/smollm2.zarr
	$(BIN)/actcache verify $(DEMO_DIR)/smollm2.zarr --recompute 4
	for arch in baseline dyncorr; do \
	  $(BIN)/sae train --store $(DEMO_DIR)/smollm2.zarr --out $(DEMO_DIR)/run-$$arch --arch $$arch \
	    --d-sae 2304 --k-start 64 --k-end 16 --batch-size 1024 --n-tokens 180000 --epochs 3 --lr 1e-3 \
	    --normalize expected_average_only_in --dead-after-tokens 50000 --overwrite || exit 1; \
	done
	for arch in baseline dyncorr; do $(BIN)/sae profile-memory --run $(DEMO_DIR)/run-$$arch --no-measure || exit 1; done

test: install
	$(BIN)/python -m pytest -q

# Each script appends a measured section to docs/benchmarks.md. bench_vs_saelens needs a side
# venv with sae-lens (see its docstring) and skips itself without one.
bench: install
	$(BIN)/python benchmarks/bench_extract.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/bench_covariance.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/bench_train.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/bench_vs_saelens.py --out docs/benchmarks.md

docs: install
	$(BIN)/python tests/gen_cli_docs.py > docs/cli.md

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
