# The two commands of the README. Each bootstraps .venv first (a no-op when up to date).
.PHONY: prune test bootstrap
bootstrap:
	bash scripts/bootstrap.sh
prune: bootstrap
	.venv/bin/multiflow prune
# pytest, then the C++ tests of the CPU kernels (CMake + ctest; SKIPPED without cmake).
test: bootstrap
	.venv/bin/python -m pytest -q
	bash scripts/ctest.sh
