"""The project's own package: message contracts, settings, and the plumbing every service shares.

Infrastructure and contracts only; business logic lives in ``services/<name>/service.py``.
"""
