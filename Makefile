# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, generate video.mp4 (tiny random model unless real weights are configured)
#   make test   - create .venv, install, run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel for laptops and CI; GPU images bring their own CUDA torch (see Dockerfile).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m worker generate --actions "w,w,wd,,l,l" --seed 7 --out video.mp4

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs video.mp4
