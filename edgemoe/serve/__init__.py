"""`edgemoe serve`: an OpenAI-compatible HTTP server over one engine (in process or on a cluster).

- api.py:     request bodies -> validated generation requests; OpenAI-shaped errors and responses
- stops.py:   stop strings over a stream of text pieces
- runner.py:  the thread that owns the engine, its bounded queue of requests, cancellation
- metrics.py: the Prometheus collector (/metrics)
- app.py:     the Starlette app (routes, API keys, server-sent events)
- chat.html:  the chat page served at /
"""
