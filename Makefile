# megavlm: the two newcomer commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2

.PHONY: setup demo test bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on a CPU machine this takes the local CPU build instead of a
	# multi-GB CUDA download; on a GPU node use the container (docker/) instead.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

setup: $(BIN)/activate

demo: setup
	PYTHONWARNINGS=ignore OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc_per_node $(NPROC) \
		--rdzv-backend=c10d --rdzv-endpoint=localhost:0 \
		tools/pretrain_vlm.py --config examples/tiny/pretrain_vlm.yaml --sample parallel.tp=2 parallel.sequence_parallel=true
	@echo
	@echo "Logs: runs/tiny_vlm/metrics.jsonl, TensorBoard: $(BIN)/tensorboard --logdir runs/tiny_vlm/tensorboard"
	@echo "Checkpoints: runs/tiny_vlm/checkpoints (continue: checkpoint.load=runs/tiny_vlm/checkpoints train.iters=200)"
	@echo "Generate: $(BIN)/python tools/generate.py --load runs/tiny_vlm/checkpoints --prompt 'What is 3 + 4?'"

test: setup
	PYTHONWARNINGS=ignore $(BIN)/python -m pytest -q -n $(NPROC) --dist loadfile --durations=40 tests

bench: setup
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/vlm_throughput.py

clean:
	rm -rf runs .pytest_cache
