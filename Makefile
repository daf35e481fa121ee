# `make demo` and `make test` set everything up on a fresh machine (a .venv beside this file).
# TORCH_SPEC pins the CPU build that installs in seconds here; override it for a CUDA machine,
# e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdi-installed

.PHONY: demo demo-cli test lint format bench bench-accuracy bench-store bench-paper kernel-report clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,triton,plot,hf,data,datasets]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/toy_looped_transformer_sdi.py --device cpu

# The README's command-line quickstart: a tiny looped causal LM, two Trainer checkpoints and JSONL
# data made locally, then `sdi attribute` on them (~20 s of CPU): top.json and the report top.html.
DEMO_DIR ?= $(or $(TMPDIR),/tmp)/sdi-cli-demo
demo-cli: $(STAMP)
	$(PY) examples/make_tiny_hf_model.py --out $(DEMO_DIR)
	$(VENV)/bin/sdi attribute --model $(DEMO_DIR)/model --checkpoints '$(DEMO_DIR)/checkpoint-*' \
		--train $(DEMO_DIR)/train.jsonl --query $(DEMO_DIR)/query.jsonl \
		--target-modules model.L_module -k 3 --out $(DEMO_DIR)/top.json

test: $(STAMP)
	$(PY) -m ruff check sdi tests bench examples
	$(PY) -m ruff format --check sdi tests bench examples
	$(PY) -m pytest

# Error vs sketch size against the exact baseline, ours and step-decomposed-influence 0.1.1 side by
# side (0.1.1 runs in its own venv: $SDI_REFERENCE_PYTHON, else bench/.venv-reference is created).
bench-accuracy: $(STAMP)
	$(PY) bench/accuracy/accuracy.py

# The feature store at scale: appends at 1,000 / 10,000 / 100,000 batches, files per 100,000 batches,
# verified vs unverified reads, end to end at N_train = 100,000 -> bench/results/store_scale.md.
bench-store: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) bench/speed/store_scale.py --out $(BENCH_RESULTS)/store_scale.md \
		--command "make bench-store"

# The paper's headline figures at its own scale (bench/paper/paper.py; < 40 min on 2 CPU cores):
# the 135M looped GPT, errors over 10 sketch seeds against an exact oracle, cost of one call, the
# open model choices -> bench/results/paper.md. On a GPU: `make bench-paper PAPER_ARGS="--device cuda"`.
bench-paper: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) bench/paper/paper.py --also adapter=add \
		--command "$(strip make bench-paper $(PAPER_ARGS))" $(PAPER_ARGS)

# Compile every Triton kernel for sm_90a / sm_100a on this CPU (no GPU, no network): registers,
# spills, shared memory, occupancy, roofline -> bench/results/kernels.md.
kernel-report: $(STAMP)
	$(PY) bench/gpu/kernel_report.py

lint: $(STAMP)
	$(PY) -m ruff check sdi tests bench examples

# CPU benchmarks, side by side in one run (bench/README.md): the pytest-benchmark suites
# bench/speed/test_*.py, then this package against step-decomposed-influence 0.1.1 (its own venv,
# bench/.venv-reference, made on first use), then the HF-model row (bench/reference/hf_compare.py:
# ALBERT, ours vs 0.1.1 vs a plain forward+backward -> bench/results/hf-latest.md), then the report
# -> bench/results/cpu-latest.md. A shared machine is steadier with `OMP_NUM_THREADS=1 make bench`.
BENCH_RESULTS := bench/results
BENCH_COMMAND ?= make bench
bench: $(STAMP)
	mkdir -p $(BENCH_RESULTS)
	$(PY) -m pytest bench -p no:cacheprovider --benchmark-only \
		--benchmark-json=$(BENCH_RESULTS)/cpu-latest-benchmarks.json
	$(PY) bench/reference/compare_reference.py --torch-spec "$(TORCH_SPEC)" \
		--json $(BENCH_RESULTS)/cpu-latest-reference.json
	$(PY) bench/reference/hf_compare.py --torch-spec "$(TORCH_SPEC)" --command "$(BENCH_COMMAND)" \
		--json $(BENCH_RESULTS)/hf-latest.json --md $(BENCH_RESULTS)/hf-latest.md
	$(PY) bench/speed/report.py --command "$(BENCH_COMMAND)" --load-before "$(LOAD_BEFORE)" \
		--benchmarks $(BENCH_RESULTS)/cpu-latest-benchmarks.json \
		--reference $(BENCH_RESULTS)/cpu-latest-reference.json \
		--hf $(BENCH_RESULTS)/hf-latest.json --out $(BENCH_RESULTS)/cpu-latest.md
bench: LOAD_BEFORE := $(shell cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)

format: $(STAMP)
	$(PY) -m ruff format sdi tests bench examples
	$(PY) -m ruff check --fix sdi tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .benchmarks
