"""``sweeper inspect``: what a sweep of one target would meet, do and cost, deleting nothing.

``report`` reads the target (through the sweep's own :class:`~sweeper.target.Target` and its
detection), counting the expired backlog by age, and builds the report; ``forecast`` turns the
counts into the calls, price and time of a sweep; ``table`` shows the report on a terminal, or
as JSON.
"""
