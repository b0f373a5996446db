# exml_fast — the README's commands. `make test` and `make demo` work from a
# fresh clone: they create (or reuse) a virtual environment, install the pinned
# torch/torchvision, build the extension, then run.
#
#   make test                  lint, Python tests (and the numerically sensitive ones again as on an
#                              AVX2-only CPU), the C++ (ctest) suite, the op tests under ASan + UBSan, the docs
#   make test-fast             the edit-test loop: lint, then the op, synthesizer and top-level unit tests not
#                              marked slow, CPU only, stopping at the first failure (2 min of tests on 2 cores)
#   make … TEST_WORKERS=1      run pytest in one process (default: 2 pytest-xdist processes, 1 thread each)
#   make lint                  ruff (configured in pyproject.toml)
#   make docs                  the Sphinx site under docs/ (warnings are errors) into docs/_build/html (~2 min)
#   make demo                  Ex-Model CL on Split MNIST: 5 LeNet-5 experts, every strategy (~15 min)
#   make demo-inversion        train a LeNet-5-BN on MNIST, invert it, save a PNG grid (~20 s)
#   make bench                 op benchmarks, printed and recorded in benches/results/
#   make bench-e2e             end-to-end synthesis benchmarks (about an hour on 2 CPU cores)
#   USE_SYSTEM_TORCH=1 make …  use `python3` and the torch it has (e.g. a GPU machine)
#   make sanitize              the CPU ops built with ASan + UBSan (apart, in build-sanitize/) and the op
#                              tests run against them (about 12 min on 2 cores, the build included)
#   make gpu-check             on a GPU machine, with its own torch (USE_SYSTEM_TORCH=1 implied):
#                              build for its GPU, every CUDA test (pytest -m cuda, ctest), memcheck,
#                              smoke runs of the benches; summary + logs in GPU_CHECK_OUT (< 10 min; exit 2
#                              without a GPU)
#   make gpu-perf              on a GPU machine, with its own torch: build once, then the performance figures
#                              (synthesis images/s against the frozen public loop in fp32 and in its best form,
#                              the BN term's share of a step, the op rows >= 100 MB, then the time-to-quality
#                              race if time is left) in < 9 min, into GPU_PERF_OUT (exit 2 without a GPU)
#   make gpu-… GPU_TAR=x.tgz   also pack the output folder into one .tgz at the end (whatever happened)
#   make gpu-data              here: copy MNIST and Fashion-MNIST into runs/gpu-data, for the GPU machine
#                              (which has no ../shared) to carry
#   make gpu-ttq               on the GPU machine, after gpu-check: the time-to-quality race at batch 256
#                              (TTQ_NETS, default the ResNets and LeNet-5-BN), resumable from runs/bench_synthesis,
#                              recorded in GPU_CHECK_OUT/benches/synthesis_cuda_ttq.{json,md}
#   make gpu-repro METHOD=m    on the GPU machine: one reproduction run too long for the CPU, at most 9 min a
#                              call (GPU_REPRO_S, default 530 s), resumed by the next call from runs/gpu-repro;
#                              m = dafl | dfad (dfkd-mnist's public-code recipe at its paper budget), skd (the
#                              paper-budget generator fit and its KD),
#                              mi-ed (the ExML Table 2 paper-budget MI-ED row, one Split MNIST stream) or
#                              skd-cil (cil-mnist's skd row under SKD's own 160-epoch schedule, five seeds run
#                              side by side, each logged to GPU_CHECK_OUT/repro/skd_cil_seed<s>.log; each
#                              finished seed lands in the ledger GPU_CHECK_OUT/repro/cil_mnist_runs.json, which a
#                              later session's call reads back); the record goes to GPU_CHECK_OUT/repro when the
#                              run finishes
#
# Variables: PYTHON (interpreter that creates the venv, or the one used with
# USE_SYSTEM_TORCH=1 and by gpu-check), VENV (default .venv), TORCH_CUDA_ARCH_LIST,
# MAX_JOBS, CMAKE_CUDA (ON/OFF: CUDA kernels and tests in the CMake build; default
# ON when torch sees a GPU), GPU_CHECK_OUT (default benches/results/gpu), GPU_PERF_OUT (default
# GPU_CHECK_OUT/perf), GPU_TAR (a .tgz gpu-check and gpu-perf pack their output into; default none).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
USE_SYSTEM_TORCH ?= 0
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
RUFF_PIN := ruff==0.17.6
# DOCS_DEPS: what `make docs` builds the site with (pyproject.toml's `docs` extra, pinned here as the venv's).
DOCS_DEPS := sphinx==9.0.4 myst-parser==5.2.0 furo==2025.12.19
# AVALANCHE_DEPS: pyproject.toml's `avalanche` extra (exml_fast.integrations.avalanche and its tests), installed
# with --no-deps: avalanche-lib 0.6.0 declares wandb, tensorboard, qpsolvers[open_source_solvers], scikit-learn, ...
# unpinned, and resolving them pulls dozens of packages (wandb's telemetry exporters, grpcio, QP solvers) and may
# upgrade ones torch and numpy share. These are exactly the modules its imports load, pinned: Avalanche itself;
# dill, gdown, pytorchcv, gputil, psutil, torchmetrics (+ lightning-utilities), qpsolvers (+ scipy),
# tensorboard (+ absl-py), imported at module level by avalanche.benchmarks / .models / .evaluation /
# .training.plugins / .logging; wandb (imported by its confusion-matrix metric) and what wandb imports (click,
# platformdirs, pydantic + pydantic-core, annotated-types, typing-inspection, protobuf, opentelemetry-api, xxhash).
AVALANCHE_DEPS := avalanche-lib==0.6.0 dill==0.4.1 gdown==6.5.1 pytorchcv==0.0.74 gputil==1.4.0 psutil==7.2.2 \
                  torchmetrics==1.9.0 lightning-utilities==0.15.3 qpsolvers==4.13.0 scipy==1.17.1 \
                  tensorboard==2.21.0 absl-py==2.5.1 wandb==0.31.0 click==8.5.1 platformdirs==4.14.8 \
                  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
                  protobuf==7.36.2 opentelemetry-api==1.45.2 xxhash==4.1.0
# COMPRESS_DEPS: pyproject.toml's `compress` extra (exml_fast.compress and its tests): torchao, where torch 2.14's
# PT2E quantisation (prepare_pt2e / convert_pt2e, the x86 Inductor quantizer) and its quantize / dequantize ops
# live; Torch-Pruning, whose dependency graph prunes the channels of residual and depthwise networks together.
# Neither needs more than torch and numpy, so they go in with the list below, --no-deps.
COMPRESS_DEPS := torchao==0.18.0 torch-pruning==1.6.1
# The optional extras the suite tests, installed --no-deps (see above); .stamps/avalanche holds the list installed.
EXTRA_DEPS := $(AVALANCHE_DEPS) $(COMPRESS_DEPS)
PY_DEPS := numpy tqdm safetensors pyyaml matplotlib pytest pytest-benchmark pytest-xdist hypothesis==6.170.15 \
           pybind11 ninja \
           "setuptools>=69" wheel \
           $(RUFF_PIN) $(DOCS_DEPS)
# Tests whose tolerances depend on the CPU's kernels (convolutions, reductions, Adam): run again with torch and
# oneDNN limited to AVX2, as on CPUs without AVX-512, so a tolerance tuned to one machine fails here first.
ISA_SENSITIVE := python_tests/ops python_tests/synth python_tests/test_training.py

ifeq ($(USE_SYSTEM_TORCH),1)
  PY := $(PYTHON)
  ENV_STAMP := .stamps/env-system
else
  PY := $(VENV)/bin/python
  ENV_STAMP := .stamps/env-venv
endif

# nvcc on PATH may sit outside the toolkit (/usr/local/bin/nvcc), which misleads
# torch's detection: point CUDA_HOME at the toolkit root when it is there.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
  export CUDA_HOME ?= /usr/local/cuda
endif
# CI has no GPU: compile (and so check) the CUDA kernels for sm_90 only.
ifeq ($(CI),true)
  export TORCH_CUDA_ARCH_LIST ?= 9.0
endif

CMAKE_BUILD_DIR := build-cmake
CMAKE_CUDA = $(shell $(PY) -c 'import torch; print("ON" if torch.cuda.is_available() else "OFF")' 2>/dev/null || echo OFF)
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: help env build lint docs test test-fast pytest pytest-avx2 xdist ctest sanitize demo demo-inversion bench bench-e2e gpu-check gpu-perf gpu-data gpu-ttq gpu-repro clean FORCE

help:
	@sed -n '1,/^$$/p' Makefile | sed 's/^# \{0,1\}//'

.stamps/env-venv:
	@mkdir -p .stamps
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) $(PY_DEPS)
	$(PY) -m pip install -q --no-deps $(EXTRA_DEPS)
	touch $@

.stamps/env-system:
	@mkdir -p .stamps
	$(PY) -c 'import torch, pytest, pybind11, numpy; print("using system torch", torch.__version__)' \
	  || { echo "USE_SYSTEM_TORCH=1 needs torch, pytest, pybind11 and numpy importable by $(PY)"; exit 1; }
	touch $@

env: $(ENV_STAMP) .stamps/avalanche

# The avalanche and compress extras: a venv made before they joined (or before their list changed) gets them here;
# the stamp holds the list installed. A system python (a GPU machine, no internet) is left as it is: their tests
# skip.
.stamps/avalanche: $(ENV_STAMP) FORCE
	@echo "$(EXTRA_DEPS)" > $@.tmp
	@if cmp -s $@.tmp $@; then rm $@.tmp; \
	elif [ "$(USE_SYSTEM_TORCH)" = 1 ]; then rm $@.tmp; echo "extras: not installed for $(PY) (their tests skip)"; \
	else $(PY) -m pip install -q --no-deps $(EXTRA_DEPS) && mv $@.tmp $@; fi

# Which interpreter and torch the extension is built against; rewritten only
# when that changes, so switching USE_SYSTEM_TORCH or upgrading torch rebuilds.
.stamps/toolchain: $(ENV_STAMP) FORCE
	@$(PY) -c 'import sys, torch; print(sys.executable, torch.__version__)' > $@.tmp
	@if cmp -s $@.tmp $@; then rm $@.tmp; else mv $@.tmp $@; fi

.stamps/build: .stamps/toolchain $(SOURCES)
	@echo "building the extension (full log: .stamps/build.log)"
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . > .stamps/build.log 2>&1 \
	  || { tail -n 60 .stamps/build.log; echo "build failed: see .stamps/build.log"; exit 1; }
	@grep -E '^ *\[exml_fast build\]' .stamps/build.log || true
	$(PY) -c 'import exml_fast; assert exml_fast.has_ops(), exml_fast.build_info(); print("built:", exml_fast.build_info())'
	touch $@

build: .stamps/build

# The suites run over TEST_WORKERS pytest-xdist processes of one torch thread each, a whole file to a process
# (--dist loadfile: a module's fixtures, such as the zoo's trained teachers, are built once). Most tests are too
# small for two threads to help, so two processes on 2 cores took the main suite from 24.3 to 14.4 min
# (2026-11-28, the same 2663 tests). TEST_WORKERS=1, or a python without xdist (a system one on a GPU machine,
# no internet), runs them in one process with torch's own thread count, as before.
TEST_WORKERS ?= 2
# A recipe's prefix: sets "$$@" to xdist's arguments and the workers' thread count to 1, or "$$@" to nothing.
XDIST = if [ "$(TEST_WORKERS)" -gt 1 ] && $(PY) -c 'import xdist' 2> /dev/null; then \
          export OMP_NUM_THREADS=1; set -- -n $(TEST_WORKERS) --dist loadfile; else set --; fi;

# A venv made before pytest-xdist joined PY_DEPS gets it here; a system python is left as it is.
xdist: $(ENV_STAMP)
	@if [ "$(USE_SYSTEM_TORCH)" != 1 ] && ! $(PY) -c 'import xdist' 2> /dev/null; then \
	  $(PY) -m pip install -q pytest-xdist; fi

# torch.compile's kernel cache lives in the build tree, one per CPU setting: a fresh clone compiles its own, and
# no kernel built for one ISA (or left half-written by a killed run in /tmp) is loaded by another run.
pytest: build .stamps/avalanche xdist
	$(XDIST) TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.stamps/inductor $(PY) -m pytest python_tests -q "$$@"

pytest-avx2: build xdist
	$(XDIST) ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 EXML_FAST_CPU_ISA=avx2 \
	  TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.stamps/inductor-avx2 \
	  $(PY) -m pytest $(ISA_SENSITIVE) -q -m "not slow and not cuda" -p no:cacheprovider "$$@"

# The venv pins ruff; a system python without it (a GPU machine, no internet) skips lint with a note.
lint: $(ENV_STAMP)
	@if ! $(PY) -m ruff --version > /dev/null 2>&1; then \
	  if [ "$(USE_SYSTEM_TORCH)" = 1 ]; then echo "make lint: ruff is not installed for $(PY): skipped"; exit 0; fi; \
	  $(PY) -m pip install -q $(RUFF_PIN); fi
	@if $(PY) -m ruff --version > /dev/null 2>&1; then $(PY) -m ruff check .; fi

ctest: $(ENV_STAMP)
	@mkdir -p $(CMAKE_BUILD_DIR)
	cmake -S . -B $(CMAKE_BUILD_DIR) -G Ninja -DPYTHON_EXECUTABLE="$$(command -v $(PY))" \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DEXML_FAST_CUDA=$(CMAKE_CUDA) > $(CMAKE_BUILD_DIR)/configure.log 2>&1 \
	  || { cat $(CMAKE_BUILD_DIR)/configure.log; exit 1; }
	cmake --build $(CMAKE_BUILD_DIR) -j2
	ctest --test-dir $(CMAKE_BUILD_DIR) --output-on-failure

test: lint pytest pytest-avx2 ctest sanitize docs

# The site under docs/, warnings as errors; its tables and record pages are generated from benches/results/ by
# docs/_ext/exml_records.py at build time. A venv made before the docs tools joined PY_DEPS gets them here.
# A system python without them (a GPU machine, no internet) skips the site with a note, as lint does.
docs: build .stamps/avalanche
	@if ! $(PY) -c 'import sphinx, myst_parser, furo' 2> /dev/null; then \
	  if [ "$(USE_SYSTEM_TORCH)" = 1 ]; then echo "make docs: sphinx, myst-parser or furo missing for $(PY): skipped"; exit 0; fi; \
	  $(PY) -m pip install -q $(DOCS_DEPS); fi
	@if $(PY) -c 'import sphinx, myst_parser, furo' 2> /dev/null; then \
	  $(PY) -m sphinx -b html -W --keep-going -q docs docs/_build/html && echo "docs: docs/_build/html/index.html"; fi

# The edit-test loop, about 2 min of tests on 2 quiet cores: the unit tests of the ops, synthesizers and top-level
# modules.
# Left to `make test`: the benchmark scripts' end-to-end runs (test_bench_*), the docs' code blocks, and the
# synthesis jobs killed mid-write or run under torchrun (subprocesses, seconds each).
FAST_TESTS := python_tests/ops python_tests/synth \
              $(filter-out python_tests/test_bench_% python_tests/test_docs.py,$(wildcard python_tests/test_*.py))
FAST_IGNORE := --ignore=python_tests/synth/test_faults.py --ignore=python_tests/synth/test_distributed_synthesis.py
test-fast: lint build xdist
	$(XDIST) TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.stamps/inductor \
	  $(PY) -m pytest $(FAST_TESTS) $(FAST_IGNORE) -q -x -m "not slow and not cuda" -p no:cacheprovider "$$@"

# The CPU ops built apart with AddressSanitizer + UndefinedBehaviorSanitizer (setup.py, EXML_FAST_SANITIZE=1)
# into $(SANITIZE_DIR)/site beside a copy of the package, and the op tests run against that copy (from its
# folder, so `import exml_fast` finds it) with the sanitizer runtimes preloaded into the uninstrumented python.
# Any finding aborts the run. detect_leaks=0: CPython and torch keep memory to the end by design.
SANITIZE_DIR ?= build-sanitize
SANITIZE_TESTS ?= python_tests/ops
sanitize: $(ENV_STAMP)
	rm -rf $(SANITIZE_DIR)/site && mkdir -p $(SANITIZE_DIR)/site
	cp -r exml_fast $(SANITIZE_DIR)/site/ && rm -f $(SANITIZE_DIR)/site/exml_fast/_C*.so
	EXML_FAST_SANITIZE=1 EXML_FAST_NO_CUDA=1 MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext \
	  --build-lib $(SANITIZE_DIR)/site --build-temp $(SANITIZE_DIR)/temp
	@# (into a file, not a pipe: grep -q would close it early, and pipefail would count nm's SIGPIPE)
	@so=$$(ls $(SANITIZE_DIR)/site/exml_fast/_C*.so) && nm -D $$so > $(SANITIZE_DIR)/symbols.txt \
	  && grep -q __asan_report_ $(SANITIZE_DIR)/symbols.txt && grep -q __ubsan_handle_ $(SANITIZE_DIR)/symbols.txt \
	  || { echo "$$so is not instrumented (no ASan/UBSan symbols)"; exit 1; }
	cd $(SANITIZE_DIR)/site && \
	  export LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	    ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:abort_on_error=1 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 && \
	  $(abspath $(PY)) -c 'import exml_fast, sys; assert exml_fast.has_ops() and "$(SANITIZE_DIR)" in exml_fast.__file__, exml_fast.__file__; print("sanitized build:", exml_fast.__file__)' && \
	  $(abspath $(PY)) -m pytest $(addprefix $(CURDIR)/,$(SANITIZE_TESTS)) -q -p no:cacheprovider \
	    --rootdir $(CURDIR) -c $(CURDIR)/pyproject.toml -m "not cuda and not slow"

demo: build
	$(PY) -m exml_fast demo

demo-inversion: build
	$(PY) -m exml_fast.experiments.demo_inversion

BENCHES := bn_stats image_priors soft_target_losses dirichlet augment window_pool tanh upsample_conv
E2E_BENCHES := synthesis data_impressions

bench: build
	for b in $(BENCHES); do $(PY) benches/bench_$$b.py; done

# End to end (about an hour on 2 CPU cores): DeepInversion images/s against the
# public loop, and zero-shot KD from 2400 Data Impressions.
bench-e2e: build
	for b in $(E2E_BENCHES); do $(PY) benches/bench_$$b.py; done

# The GPU machine's check, orchestrated by benches/gpu_check.py with $(PYTHON) (the
# machine's own torch, never the venv): it checks for a GPU before building anything,
# builds with pip install --no-build-isolation -e . for that GPU with all cores, and
# keeps going past a failing step. Exit 0 all passed, 1 a step failed, 2 no GPU.
GPU_CHECK_OUT ?= benches/results/gpu
GPU_PERF_OUT ?= $(GPU_CHECK_OUT)/perf
GPU_TAR ?=

gpu-check:
	$(PYTHON) benches/gpu_check.py --out "$(GPU_CHECK_OUT)" $(if $(GPU_TAR),--tar "$(GPU_TAR)")

# The performance figures (benches/gpu_perf.py, same machine, same interpreter): built once, then each
# benchmark as a step with its own timeout inside a 530 s budget; the race's state is kept under GPU_PERF_OUT.
gpu-perf:
	$(PYTHON) benches/gpu_perf.py --out "$(GPU_PERF_OUT)" $(if $(GPU_TAR),--tar "$(GPU_TAR)")

# The time-to-quality race of bench_synthesis on the GPU, with the library gpu-check built. Its data come from
# EXML_FAST_DATA, else runs/gpu-data (`make gpu-data` here, then carry runs/gpu-data); every measurement is
# kept in runs/bench_synthesis, so a call cut off by its time limit resumes where it stopped.
SHARED_DATA ?= ../shared/data
TTQ_NETS ?= resnet18 resnet34 lenet5_bn

gpu-data:
	rm -rf runs/gpu-data && mkdir -p runs/gpu-data
	cp -r $(SHARED_DATA)/mnist $(SHARED_DATA)/fashion-mnist runs/gpu-data/ && chmod -R u+w runs/gpu-data
	@du -sh runs/gpu-data

gpu-ttq:
	EXML_FAST_DATA="$${EXML_FAST_DATA:-$(CURDIR)/runs/gpu-data}" PYTHONPATH=$(CURDIR) \
	  $(PYTHON) benches/bench_synthesis.py --device cuda --ttq-only --batch 256 --nets $(TTQ_NETS) \
	  --suffix _ttq --out "$(GPU_CHECK_OUT)/benches"

# One reproduction run that needs a GPU (issue 42), cut at GPU_REPRO_S and resumed by the next call: every
# piece of work is kept under runs/gpu-repro (fit checkpoints, DI shards, expert streams and run folders).
GPU_REPRO_S ?= 530
GPU_REPRO_OUT ?= $(GPU_CHECK_OUT)/repro
# skd-cil's five seeds, each a process of its own beside the others (its log: GPU_REPRO_OUT/skd_cil_seed<s>.log),
# into the ledger; the table is made from the ledger once all five have finished. A step of three small networks
# at batch 32 leaves the GPU idle between launches, so the seeds share it.
SKD_CIL_SEEDS := 0 1 2 3 4
SKD_CIL_ARGS = --budget paper --strategies skd --device cuda --out runs/gpu-repro/cil-mnist --results "$(GPU_REPRO_OUT)"
GPU_REPRO_RUN = EXML_FAST_DATA="$${EXML_FAST_DATA:-$(CURDIR)/runs/gpu-data}" PYTHONPATH=$(CURDIR) \
  timeout --signal=INT $(GPU_REPRO_S) $(PYTHON) -m exml_fast reproduce
gpu-repro:
	@set +e; case "$(METHOD)" in \
	  dafl|dfad) mkdir -p "$(GPU_REPRO_OUT)"; set -x; $(GPU_REPRO_RUN) dfkd-mnist --budget paper --recipe public \
	    --methods $(METHOD) --device cuda --out runs/gpu-repro/dfkd-mnist --results "$(GPU_REPRO_OUT)" ;; \
	  skd) mkdir -p "$(GPU_REPRO_OUT)"; set -x; $(GPU_REPRO_RUN) dfkd-mnist --budget paper --methods $(METHOD) --device cuda \
	    --out runs/gpu-repro/dfkd-mnist --results "$(GPU_REPRO_OUT)" ;; \
	  mi-ed) mkdir -p "$(GPU_REPRO_OUT)"; set -x; $(GPU_REPRO_RUN) exml-mnist --budget paper --runs 1 --scenarios split_mnist \
	    --strategies mi-ed --device cuda --out runs/gpu-repro/exml-mnist --results "$(GPU_REPRO_OUT)" ;; \
	  skd-cil) mkdir -p "$(GPU_REPRO_OUT)"; pids=(); for s in $(SKD_CIL_SEEDS); do \
	      ( set -x; OMP_NUM_THREADS=2 $(GPU_REPRO_RUN) cil-mnist $(SKD_CIL_ARGS) --seeds $$s --progress ) \
	        > "$(GPU_REPRO_OUT)/skd_cil_seed$$s.log" 2>&1 & pids+=($$!); done; \
	    status=0; for p in "$${pids[@]}"; do wait $$p || status=$$?; done; \
	    for s in $(SKD_CIL_SEEDS); do echo "== seed $$s ($(GPU_REPRO_OUT)/skd_cil_seed$$s.log):"; \
	      tr '\r' '\n' < "$(GPU_REPRO_OUT)/skd_cil_seed$$s.log" | grep -v '^\s*$$' | tail -n 4; done; \
	    if [ $$status -eq 0 ]; then set -x; $(GPU_REPRO_RUN) cil-mnist $(SKD_CIL_ARGS) --runs $(words $(SKD_CIL_SEEDS)); \
	      else (exit $$status); fi ;; \
	  *) echo "gpu-repro: METHOD must be one of dafl, dfad, skd, mi-ed, skd-cil; got '$(METHOD)'" >&2; exit 2 ;; \
	esac; status=$$?; if [ $$status -eq 124 ]; then \
	  echo "gpu-repro: stopped at $(GPU_REPRO_S) s; run the same command again to resume" >&2; fi; exit $$status

clean:
	rm -rf build $(CMAKE_BUILD_DIR) build-cmake-cuda $(SANITIZE_DIR) .stamps exml_fast/_C*.so *.egg-info \
	  docs/_build docs/_generated docs/records docs/api/generated

FORCE:
