# colo-appliance: every set-up step, idempotent, for a fresh Debian 12 machine as root.
#   make demo   kvstore migrated and then protected by COLO under load, its primary killed; a COLO drill
#   make test   the whole test suite
#   make bench  benchmarks; results go to docs/benchmarks.md
#   make install  the appliance where systemd/colo-appliance@.service expects it (docs/operations.md)

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
BUILD   := $(CURDIR)/build
EXTRAS  ?= test
# make install: the unit runs $(PREFIX)/.venv/bin/colo-appliance and reads $(SYSCONFDIR)/NAME.toml
PREFIX     ?= /opt/colo-appliance
SYSCONFDIR ?= /etc/colo-appliance
UNITDIR    ?= /etc/systemd/system
SYSUSERSDIR ?= /usr/lib/sysusers.d
APT_PACKAGES := gcc make libc6-dev python3-venv python3-dev iproute2 redis-tools redis-server kmod procps chromium openssl systemd util-linux

.PHONY: all deps venv guests test demo bench install install-files clean

all: guests

# System packages: installed only when one is missing, so an offline re-run is a no-op.
$(BUILD)/.deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@mkdir -p $(BUILD) && touch $@
deps: $(BUILD)/.deps

# The virtualenv, with the package (and its C extension) installed editable.
$(VENV)/.installed: pyproject.toml $(wildcard native/*.c native/*.h) $(BUILD)/.deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	@touch $@
venv: $(VENV)/.installed

guests: $(BUILD)/.deps
	$(MAKE) -s -C appliance/guest BUILD=$(BUILD)/guest
	$(MAKE) -s -C appliance/guest/hosted BUILD=$(BUILD)/hosted

test: venv guests
	@test -e /dev/kvm || { echo "error: /dev/kvm is missing; the KVM tests need it" >&2; exit 1; }
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: venv guests
	$(PY) -m appliance.demo

bench: venv guests
	$(PY) bench/native_bench.py --write docs/benchmarks.md
	$(PY) bench/vmm_bench.py --write docs/benchmarks.md
	$(PY) bench/migration_bench.py --write docs/benchmarks.md
	$(PY) bench/colo_bench.py --write docs/benchmarks.md
	$(PY) bench/colo_net_bench.py --write docs/benchmarks.md

# The source tree (no venv, build or git data) into PREFIX, the unit (pointed at PREFIX) into
# UNITDIR, the example configs into SYSCONFDIR/examples; existing configs are never touched.
install-files:
	install -d -m 0755 $(PREFIX) $(UNITDIR) $(SYSCONFDIR)/examples
	tar -C $(CURDIR) --exclude=./.venv --exclude=./build --exclude=./.git --exclude='*.egg-info' \
	    --exclude=__pycache__ --exclude='*.so' -cf - . | tar -C $(PREFIX) -xf -
	sed 's|/opt/colo-appliance|$(PREFIX)|g; s|/etc/colo-appliance|$(SYSCONFDIR)|g' \
	    systemd/colo-appliance@.service > $(UNITDIR)/colo-appliance@.service
	install -m 0644 systemd/examples/node-a.toml systemd/examples/node-b.toml $(SYSCONFDIR)/examples/
	@if [ -d /run/systemd/system ] && [ "$(UNITDIR)" = /etc/systemd/system ]; then systemctl daemon-reload; fi

# Then its own virtualenv (no test extras) and guest images, built in PREFIX.
install: install-files
	$(MAKE) -C $(PREFIX) venv guests EXTRAS=
	install -D -m 0644 systemd/colo-appliance.sysusers $(SYSUSERSDIR)/colo-appliance.conf
	systemd-sysusers $(SYSUSERSDIR)/colo-appliance.conf    # the unit's user, in the kvm group
	@echo "installed in $(PREFIX); unit $(UNITDIR)/colo-appliance@.service; configs: $(SYSCONFDIR)/NAME.toml" \
	    "(examples in $(SYSCONFDIR)/examples)"

clean:
	rm -rf $(BUILD) $(VENV) *.egg-info
