"""The OpenAI-compatible example server (`python examples/serve.py`): FastAPI routes in app.py,
the wire format in protocol.py, Prometheus metrics in metrics.py, text <-> ids in text.py."""
