# Set-up and the two commands. Works on a fresh Debian machine with Python 3.11 and root.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hetero-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# torch 2.14.1 + torchvision 0.29.1 install from this machine's local wheels (pip); pinned so pip
# never reaches for a different multi-GB build.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install data ssh browser demo deploy test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[onnx,coreml,report,dev]'
	touch $(STAMP)

# Fashion-MNIST: the Debian package if it is missing and nothing else provides the data, then a
# check (or download) by hetero itself, which fails with a one-line hint when it cannot find it.
data: $(STAMP)
	@if [ ! -f "$(FMNIST)" ] && [ -z "$$HETERO_DATA" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
		echo "apt-get could not install dataset-fashion-mnist; hetero will try to download it"; \
	fi
	$(VENV)/bin/hetero data

# OpenSSH client and server for tests/devices/test_remote.py, which starts its own throwaway sshd on
# 127.0.0.1 (the tests skip without them); best effort, only as root. The system sshd that the
# package enables is stopped and disabled again when this target installed it.
ssh:
	@if { [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null || ! command -v scp >/dev/null; } && \
		[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		had_sshd=$$([ -x /usr/sbin/sshd ] && echo 1); \
		{ apt-get install -y -q openssh-server openssh-client >/dev/null 2>&1 || \
		  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q openssh-server openssh-client >/dev/null 2>&1) || \
		  echo "apt-get could not install openssh-server/openssh-client; the remote tests will be skipped"; } && \
		if [ -z "$$had_sshd" ] && [ -d /run/systemd/system ]; then \
			systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true; \
		fi; \
	fi

# Debian's chromium for tests/app/test_verify_html.py, which renders verify's HTML report headless
# and screenshots it (the test skips without it); best effort, only as root.
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
		echo "apt-get could not install chromium; the browser test will be skipped"; \
	fi

demo: data
	$(VENV)/bin/hetero demo

# every deployment format of the demo's edge model (run `make demo` first), fidelity on the 10k test
# queries against the cloud gallery
deploy: data
	@test -d runs/demo/edge || { echo "error: no runs/demo/edge; run make demo first"; exit 2; }
	$(VENV)/bin/hetero export --edge runs/demo/edge --cloud runs/demo/cloud --check-real --check-samples 10000 \
		--out runs/demo/deploy --overwrite

# one pytest-xdist worker per core, a whole test file per worker (its module fixtures built once); the
# files with slow tests go first (tests/conftest.py) so that the workers finish together, in that order:
# without --no-loadscope-reorder xdist hands out the files with the most tests first, and the longest
# single tests (README, demo slice) started last
test: data ssh browser
	$(VENV)/bin/pytest -q --durations=15 -n auto --dist loadfile --no-loadscope-reorder

bench: data
	$(PY) benchmarks/metrics_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
