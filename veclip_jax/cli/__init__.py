"""Command-line entry points: `launch/*.py` and the console scripts of pyproject.toml call these."""
