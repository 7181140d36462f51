# make demo  — install into .venv if needed (with ik_llama.cpp, a wheel), then move the built-in trained BitNet
#              HF -> Flax -> npz -> GGUF -> HF, verify every step and generate in every runtime installed
# make test  — install into .venv if needed, then run the test suite
# make bench — the 2B4T-shaped benchmarks of BENCHMARKS.md, written into it (needs ~10 GB of disk and ~45 minutes;
#              run on an idle machine: bitnet.cpp's threads busy-wait)
# make converter — fetch llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist, once, into
#                  ~/.cache/bitnet-convert) for tests/test_llama_cpp_converter.py; the only step that needs the network

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extras installed with the package: `make test EXTRAS=test,llama,ik-llama` adds the tests in llama.cpp and
# ik_llama.cpp (CI does).
EXTRAS ?= test
# The demo generates in ik_llama.cpp too (a wheel, quick); llama.cpp (a 14-minute build) and bitnet.cpp
# (~/.cache/bitnet-cpp-4645960 or $BITNET_CPP_DIR) it uses when they are there.
DEMO_EXTRAS ?= test,ik-llama
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
export JAX_PLATFORMS ?= cpu
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test converter bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build that lies on these machines' disk (an unpinned torch pulls CUDA)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	# the engine's CPU kernels (AVX2 / AVX-512 VNNI / AMX): built now rather than on first use; never fatal
	$(PY) -m bitnet_model.native
	touch $(STAMP)

# bitnet.cpp where ../shared/runtimes/bitnet.cpp/build.sh (and .ci/run) puts it, unless BITNET_CPP_DIR says otherwise
BITNET_CPP_DEFAULT := $(wildcard $(HOME)/.cache/bitnet-cpp-4645960/build/bin)

demo:
	$(MAKE) --no-print-directory install EXTRAS=$(DEMO_EXTRAS)
	$(if $(BITNET_CPP_DEFAULT),BITNET_CPP_DIR=$${BITNET_CPP_DIR:-$(HOME)/.cache/bitnet-cpp-4645960}) \
		$(PY) -m bitnet_convert.demo demo-out

test: $(STAMP)
	$(PY) -m pytest -q

converter: $(STAMP)
	$(PY) tests/llama_cpp_converter.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --repeat 5 --update BENCHMARKS.md
	$(PY) benchmarks/bench_tokenizer.py
	$(PY) benchmarks/bench_generate.py bench-out/2b4t-hf --native-levels avx2 --full-head --int8-head --rounds 3 --repeats 3 \
		--update BENCHMARKS.md
	$(PY) benchmarks/bench_native.py

clean:
	rm -rf demo-out bench-out .pytest_cache
