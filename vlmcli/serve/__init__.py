"""`vlm serve`: the OpenAI-compatible HTTP front end (app.py: the routers chat, embeddings and status,
the request models in schemas.py) over worker processes (workers.py)."""
