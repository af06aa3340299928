"""`longboi serve`: an OpenAI-compatible HTTP server over a continuous-batching engine.

The engine (engine.py) needs only torch; the HTTP layer (api.py) needs the `serve` extra
(FastAPI + uvicorn), imported only when a server starts.
"""
