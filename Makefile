# Quick start: `make demo` (extract a store from the real demo model) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-out
DEMO_TOKENS ?= 65536
DEMO_HOOK ?= blocks.5.hook_resid_post
DEMO_SEEDS ?= 1
# baseline, topk, dyncorr (eps 1e-6), dyncorr (eps 0): the same tokens, batch, lr and seeds (docs/results.md).
DEMO_EXPERIMENT ?= --d-sae 1152 --k-start 64 --k-end 16 --batch-size 512 --n-tokens 184320 --epochs 3 \
  --lr 1e-3 --dead-after-tokens 10000 --log-every 5 --eval-windows 16

# The stability study (docs/results.md): STUDY_SCALE=full (>= 2M tokens, hours on 2 CPU cores) or small
# (minutes). On a GPU box: STUDY_MODEL=google/gemma-2-2b STUDY_DEVICE=cuda make study
STUDY_SCALE ?= full
STUDY_MODEL ?= embedded:smollm2-135m
STUDY_DEVICE ?= auto
STUDY_DIR ?= study-out-$(STUDY_SCALE)
STUDY_ARGS ?=

.PHONY: install demo study test bench docs clean

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
	rm -rf $(DEMO_DIR)/experiment
	$(BIN)/sae experiment --store $(DEMO_DIR)/smollm2.zarr --out $(DEMO_DIR)/experiment --seeds $(DEMO_SEEDS) \
	  $(DEMO_EXPERIMENT)
	for v in baseline dyncorr; do $(BIN)/sae profile-memory --run $(DEMO_DIR)/experiment/runs/$$v-s0 --no-measure || exit 1; done
	@echo "report: $(DEMO_DIR)/experiment/report/report.md"
	$(BIN)/sae features $(DEMO_DIR)/experiment/runs/dyncorr-s0 --out $(DEMO_DIR)/features  # last line: the dashboard's index.html

# Resumable: re-running keeps the store and the finished runs.
study: install
	$(BIN)/sae study --out $(STUDY_DIR) --scale $(STUDY_SCALE) --model $(STUDY_MODEL) --device $(STUDY_DEVICE) $(STUDY_ARGS)

test: install
	$(BIN)/python -m pytest -q

# Each script appends a measured section to docs/benchmarks.md. bench_vs_saelens needs a side
# venv with sae-lens (see its docstring) and skips itself without one.
bench: install
	$(BIN)/python benchmarks/bench_extract.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/bench_covariance.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/bench_train.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/bench_multi.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/bench_checksums.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/bench_features.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/bench_kernels.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/bench_vs_saelens.py --out docs/benchmarks.md

docs: install
	$(BIN)/python tests/gen_cli_docs.py > docs/cli.md

clean:
	rm -rf $(DEMO_DIR) study-out-small .pytest_cache
