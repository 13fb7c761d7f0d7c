"""The OpenAI-compatible FastAPI server (see DESIGN.md, "Server surface").

Talks to a backend of `reasonmaxxer.steering` through one narrow interface.
"""
