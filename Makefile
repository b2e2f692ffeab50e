# invites_api: `make test` runs the suite (standard library only).
PYTHON ?= python3

.PHONY: test test-debian12 test-debian13 check bench bench-compare clean

test:
	$(PYTHON) test_invites_api.py

# The CI script for the other Debian release, in a fresh debootstrap root (as root; .ci/run
# runs the one that is not this machine's).
test-debian12:
	contrib/test-in-root bookworm

test-debian13:
	contrib/test-in-root trixie

# Python 3.9 compatibility (needs `pip install vermin`).
check:
	vermin -t=3.9- --no-tips --violations invites_api.py

# Throughput, latency, growth, CLI start-up, RSS (wrk if installed).
bench:
	$(PYTHON) bench/bench.py run

# Side by side with Debian's Prosody 0.12 + mod_invites_api (installs it).
bench-compare:
	command -v prosody >/dev/null && dpkg -s lua-dbi-sqlite3 >/dev/null 2>&1 || \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prosody prosody-modules lua-dbi-sqlite3 wrk)
	$(PYTHON) bench/bench.py compare

clean:
	rm -rf __pycache__ bench/__pycache__
