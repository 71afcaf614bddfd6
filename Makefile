# The README's commands. Each one installs what it needs first (deploy/bootstrap.sh).
.PHONY: demo test stack-up stack-down

demo:  ## install, start the embedded stack and Lookout's main job
	bash deploy/bootstrap.sh
	.venv/bin/lookout demo

test:  ## install, then lint, types and the whole test suite on real throw-away servers
	bash deploy/test.sh

stack-up:
	bash deploy/bootstrap.sh
	.venv/bin/lookout stack up

stack-down:
	.venv/bin/lookout stack down
