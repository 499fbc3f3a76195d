# Two commands for a fresh clone:
#   make test   set up .venv, build ngcuda (CUDA kernels included where nvcc is found), run the suite
#   make demo   set up .venv, build ngcuda, run the main job (`ngcuda train`)
PYTHON ?= python3
VENV ?= .venv
# torch 2.14.1 is the CUDA 13.0 build; on a CPU-only machine TORCH=torch==2.13.0 is a 190 MB CPU build.
TORCH ?= torch==2.14.1
# 1: build the CUDA kernels and fail if they cannot be built; 0: CPU only; empty: build them if possible.
NGCUDA_CUDA ?= 1
MAX_JOBS ?= 2
PYTEST_ARGS ?=

BIN := $(VENV)/bin
DEPS := $(VENV)/.deps-installed

.PHONY: setup build test demo bench ctest clean

setup: $(DEPS)

$(DEPS): Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install "$(TORCH)" ninja numpy scipy tqdm matplotlib pytest hypothesis torch-geometric
	touch $@

build: setup
	NGCUDA_CUDA=$(NGCUDA_CUDA) MAX_JOBS=$(MAX_JOBS) $(BIN)/pip install --no-build-isolation --no-deps .
	cd /tmp && $(abspath $(BIN))/python -c "import ngcuda; print('ngcuda build:', ngcuda.build_info())"

test: build
	NGCUDA_EXPECT_CUDA=$(NGCUDA_CUDA) $(BIN)/pytest tests $(PYTEST_ARGS)

demo: build
	$(BIN)/ngcuda train

bench: build
	$(BIN)/python -m benchmarks --quick

# The C++ test, built with CMake against the installed torch (CPU kernels).
ctest: setup
	cmake -S . -B cmake-build -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" -DPython3_EXECUTABLE=$(abspath $(BIN))/python -DCMAKE_BUILD_TYPE=Release
	cmake --build cmake-build -j $(MAX_JOBS)
	cd cmake-build && ctest --output-on-failure

clean:
	rm -rf build cmake-build *.egg-info ngcuda/_C*.so
