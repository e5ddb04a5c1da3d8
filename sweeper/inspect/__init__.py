"""``sweeper inspect``: what a sweep of one target would meet, do and cost, deleting nothing.

``report`` reads the target and builds the report, ``forecast`` prices and times a sweep,
``table`` shows the report (its layout: docs/development.md).
"""
