"""The routes, one module per resource, each an APIRouter that server/app.py includes: chat (OpenAI's chat
completions), memories (mem0's memory routes), jobs, keys (admin), health (healthz, metrics, the page, the model
list)."""
