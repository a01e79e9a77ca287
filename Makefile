# The two commands of the README. Both set up .venv first (scripts/setup.sh, quick when done).
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# Capture the bundled all-MiniLM-L6-v2, run the default recipe, write out/minilm/model.onnx
# (+ recipe.json, report.json) and print the report.
demo: setup
	.venv/bin/rarefy optimize minilm -o out/minilm

# The quick suite (CI runs exactly this); pytest's non-zero exits, 5 = no tests ran, fail make.
test: setup
	.venv/bin/python -m pytest -q -m "not slow"
