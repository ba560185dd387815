"""``python -m vlm.serve MODEL_DIR``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for every model
``vlm.load`` opens (docs/deploy.md). :func:`vlm.serve.app.create_app` builds the app around an opened model;
:class:`vlm.serve.scheduler.Scheduler` batches concurrent requests into one generate call."""
