# Two commands for a fresh clone (the build is an editable install, so the tests and benchmarks
# run against the kernels compiled into ngcuda/):
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
	NGCUDA_CUDA=$(NGCUDA_CUDA) MAX_JOBS=$(MAX_JOBS) $(BIN)/pip install --no-build-isolation --no-deps -e .
	cd /tmp && $(abspath $(BIN))/python -c "import ngcuda; print('ngcuda build:', ngcuda.build_info())"

test: build ctest
	NGCUDA_EXPECT_CUDA=$(NGCUDA_CUDA) $(BIN)/pytest tests $(PYTEST_ARGS)

demo: build
	$(BIN)/ngcuda train

bench: build
	$(BIN)/python -m benchmarks all --quick

# The C++ test, built with CMake against the installed torch (CPU kernels). A CUDA build of torch
# makes find_package(Torch) look for the toolkit: point it at nvcc's toolkit and the wheels' NVRTC.
ctest: setup
	TORCH_CUDA_ARCH_LIST=9.0 cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda \
	  -DCUDA_nvrtc_LIBRARY="$$($(BIN)/python -c 'import glob, nvidia; print((sorted(glob.glob(nvidia.__path__[0] + "/*/lib/libnvrtc.so.*")) or [""])[0])' 2>/dev/null)"
	cmake --build cmake-build -j $(MAX_JOBS)
	cd cmake-build && ctest --output-on-failure

clean:
	rm -rf build cmake-build *.egg-info ngcuda/_C*.so
