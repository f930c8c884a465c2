"""megamem serve: an OpenAI-compatible chat server with a mem0-shaped memory API, tenants and injection jobs.

One process holds the model. Chat requests answer through the library's answer pipeline (megamem.answer) and
go through one batching engine (engine.py) that decodes the requests waiting together in one forward, each row
with its own gated mixture; adds are jobs in a queue persisted in the store's SQLite (jobs.py) that one
training worker takes, with a lease; API keys map callers to namespaces (tenants.py), and every route checks
that what it touches is the caller's. runtime.py holds the parts (Server), auth.py resolves the caller,
routes/ has one router per resource, views.py and errors.py shape the answers, and app.py wires them.
"""
