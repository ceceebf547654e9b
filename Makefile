# The two commands a newcomer needs are `make demo` and `make test`; both run `make setup`
# first, which installs everything and is cheap when everything is already there.
SHELL := /bin/sh
PY := /usr/bin/python3
VENV := .venv
BUILD := build
STAMP := $(BUILD)/stamps

.PHONY: setup test test-host test-lab demo lab zdtm clean

setup: $(STAMP)/apt $(STAMP)/venv lab zdtm

$(STAMP)/apt: tools/apt-packages.txt tools/setup-apt.sh
	@mkdir -p $(STAMP)
	tools/setup-apt.sh
	@touch $@

# The venv sees Debian's site packages: pycriu comes with the criu package and needs
# Debian's python3-protobuf; the same venv runs inside the lab guest.
$(STAMP)/venv: pyproject.toml $(STAMP)/apt
	@mkdir -p $(STAMP)
	[ -x $(VENV)/bin/python ] || $(PY) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

# Kernel, initramfs and test programs of the lab; `spfs-lab build` is idempotent itself.
lab: $(STAMP)/venv
	$(VENV)/bin/spfs-lab build

# CRIU's zdtm static tests, built from Debian's CRIU source tarball (fetched once through a
# private apt configuration under build/criu-src; the build is stamped under build/zdtm).
zdtm: $(STAMP)/venv
	$(VENV)/bin/spfs-lab zdtm build

test: setup
	$(VENV)/bin/python tools/run-tests

test-host: setup
	$(VENV)/bin/python tools/run-tests --host-only

test-lab: setup
	$(VENV)/bin/python tools/run-tests --lab-only

demo: setup
	$(VENV)/bin/spfs-lab demo

clean:
	rm -rf $(BUILD) $(VENV)
