"""ReasonMaxxer: gated correction adapters for LLM reasoning (arXiv 2605.06241).

The distribution installs the project's top-level folders under this namespace:
`reasonmaxxer.steering` (decode-time core), `reasonmaxxer.training`, `reasonmaxxer.server`,
`reasonmaxxer.clients`.
"""

__version__ = "0.1.0"
