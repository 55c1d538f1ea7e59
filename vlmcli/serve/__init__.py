"""`vlm serve`: the OpenAI-compatible HTTP front end (app.py) over worker processes (workers.py)."""
