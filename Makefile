# megaflow: two commands do everything on a fresh machine, set-up included.
#   make train   creates .venv on first use, then trains the default STARFlow2 on Fashion-MNIST
#   make test    creates .venv on first use, then runs the test suite
# ARGS passes arguments: make train ARGS="--config configs/tiny.yaml --set train.steps=50"
SHELL := /bin/bash
STAMP := .venv/.installed-$(shell cat requirements.txt requirements-nodeps.txt pyproject.toml | sha1sum | cut -c1-12)
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: env train test bench clean-env
env: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml tools/setup_env.sh
	bash tools/setup_env.sh
	rm -f .venv/.installed-* && touch $@

train: env
	.venv/bin/megaflow train $(ARGS)

test: env
	bash tools/run_tests.sh $(ARGS)

clean-env:
	rm -rf .venv
