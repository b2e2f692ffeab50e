# invites_api: `make test` runs the suite (standard library only).
PYTHON ?= python3

.PHONY: test test-stress test-debian12 test-debian13 test-stress-debian13 check bench bench-compare \
	bench-against clean

test:
	$(PYTHON) test_invites_api.py

# The whole suite 8 times (STRESS_RUNS) with both cores kept busy: timing-dependent tests fail here.
# Not part of CI.
test-stress:
	contrib/test-stress

# The CI script for the other Debian release, in a fresh debootstrap root (as root; .ci/run
# runs the one that is not this machine's).
test-debian12:
	contrib/test-in-root bookworm

test-debian13:
	contrib/test-in-root trixie

# test-stress in a fresh Debian 13 root, twice (STRESS_RUNS).
test-stress-debian13:
	INVITES_API_TEST_TARGET=test-stress STRESS_RUNS=$${STRESS_RUNS:-2} contrib/test-in-root trixie

# Python 3.9 compatibility, unused names, and the layout (100 columns; one-line error classes
# allowed): needs `pip install vermin pyflakes pycodestyle`.
check:
	vermin -t=3.9- --no-tips --violations invites_api.py
	$(PYTHON) -m pyflakes invites_api.py test_invites_api.py bench/bench.py
	$(PYTHON) -m pycodestyle --max-line-length=100 --ignore=E701,W503,W504 invites_api.py test_invites_api.py

# Throughput, latency, growth, CLI start-up, RSS (wrk if installed).
bench:
	$(PYTHON) bench/bench.py run

# Side by side with Debian's Prosody 0.12 + mod_invites_api (installs it).
bench-compare:
	command -v prosody >/dev/null && dpkg -s lua-dbi-sqlite3 >/dev/null 2>&1 || \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prosody prosody-modules lua-dbi-sqlite3 wrk)
	$(PYTHON) bench/bench.py compare

# Built-in creates/s of this checkout against another revision's invites_api.py (REV, default HEAD:
# the last commit, so that a change not yet committed is measured against what it changes).
REV ?= HEAD
bench-against:
	tmp=$$(mktemp -d) && git show $(REV):invites_api.py > $$tmp/invites_api.py && \
	    $(PYTHON) bench/bench.py against $$tmp/invites_api.py; status=$$?; rm -rf $$tmp; exit $$status

clean:
	rm -rf __pycache__ bench/__pycache__
