"""Seeing the product run: Prometheus metrics, JSON logs without member data, signed alerts.

Imported by ``tasks``, ``celery`` and ``sync``; imports nothing of ours but ``config`` (and
``klaviyo.redact``, the one module that knows what a key looks like). The Celery wiring (which
signal calls what) lives in ``segops_sync.celery``.
"""
