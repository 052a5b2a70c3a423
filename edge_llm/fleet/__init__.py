"""Scaling out: edge-llm on Ray Serve (deployment.py, router.py) with conversation affinity
(affinity.py). Needs the `ray` extra; the single-machine server never imports this package."""
