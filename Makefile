# invites_api: `make test` runs the suite (standard library only).
PYTHON ?= python3

.PHONY: test check bench clean

test:
	$(PYTHON) test_invites_api.py

# Python 3.9 compatibility (needs `pip install vermin`).
check:
	vermin -t=3.9- --no-tips --violations invites_api.py

clean:
	rm -rf __pycache__ bench/__pycache__
