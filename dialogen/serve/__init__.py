"""`dialogen serve`: an OpenAI-compatible HTTP API, stored sessions and a web chat page.

  cli.py          the command: flags, checks, binding, uvicorn
  app.py          the FastAPI app: auth, limits, errors, health, models, the page
  guard.py        Host and Origin checks (DNS rebinding, cross-site requests), CORS, JSON-only POSTs
  completions.py  POST /v1/chat/completions (plain and streamed)
  text.py         POST /v1/completions: legacy text completion, no template
  channel.py      what the routes share: body reading, job submission, events from job threads
  sessions.py     /v1/sessions: stored conversations with live KV caches
  protocol.py     reading request bodies, OpenAI-shaped errors and response objects
  schema.py       request bodies as pydantic models (OpenAI schema, strict types)
  service.py      what the routes drive: engine, store, KV-cache LRU, API keys
  worker.py       the one model thread: bounded queue, rounds, cancellation
  batching.py     one decode step for many conversations, each with its own cache
  store.py        SQLite (WAL) session store
  launch.py       run a server in a child process (tests, benchmarks)
  static/         the chat page (plain HTML/JS/CSS)

FastAPI and uvicorn are imported only when the server runs: pip install 'dialogen[serve]'.
"""
