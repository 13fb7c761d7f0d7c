"""Clients of the HTTP API: the Python client over the `openai` SDK and the A/B tool."""
