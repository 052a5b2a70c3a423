import sys

from edge_llm.cli import main

# vLLM starts its engine processes with `spawn`, which re-imports the main module: without the
# guard, `python -m edge_llm serve --engine vllm` would run the CLI again in each child.
if __name__ == "__main__":
    sys.exit(main())
