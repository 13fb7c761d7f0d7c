"""Decode-time core, with no HTTP: gate math, adapter artifacts, and the backends that decode with gating.

Imports neither `reasonmaxxer.server` nor `reasonmaxxer.training`.
"""
