"""Offline fitting of correction adapters from base-model rollouts (see DESIGN.md).

Imports `reasonmaxxer.steering`, never `reasonmaxxer.server`.
"""
