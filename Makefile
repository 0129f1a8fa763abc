# Everything a fresh machine needs, in two commands: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO := build/demo

.PHONY: install demo test lint bench bench-peers bench-accuracy clean

install:
	$(PIP) install --quiet -e '.[test]'

demo: install
	@test -f sample_models/convnet.state_dict.pt || $(PYTHON) sample_models/train.py
	mkdir -p $(DEMO)
	bnfold inspect sample_models/convnet.state_dict.pt --arch sample_models/archs.py:ConvNet
	bnfold fuse sample_models/convnet.state_dict.pt --arch sample_models/archs.py:ConvNet \
		--inputs sample_models/convnet.inputs.npz --out $(DEMO)/convnet.onnx --force
	bnfold fuse sample_models/tokennet.state_dict.pt --arch sample_models/archs.py:TokenNet \
		--inputs sample_models/tokennet.inputs.npz --out $(DEMO)/tokennet.onnx --force

test: install
	$(PYTHON) -m pytest

lint:
	ruff check bnfold tests bench
	mypy

bench: install
	$(PYTHON) bench/run.py

bench-peers: install
	$(PIP) install --quiet onnxsim
	$(PYTHON) bench/peers.py

# issue 17: accuracy given back by `bnfold recalibrate` on damaged models, beside AIMET
# (AIMET from /tmp/aimet-venv when it is there; see the script's docstring)
bench-accuracy: install
	$(PYTHON) bench/recalibrate_accuracy.py

clean:
	rm -rf build .pytest_cache .hypothesis
