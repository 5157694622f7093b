"""The message journey: events every room emits about a message, stored, indexed and traced.

Rooms emit through one small interface (mailsys.journey.events.IJourneyRecorder); the store
(mailsys.journey.store) keeps the events in SQLite, indexed by queue id, Message-ID and address;
the writer (mailsys.journey.writer) is the one thread that writes them; ``mailsys trace``
(mailsys.journey.trace) reads them back as steps with the rule behind each. This package imports
no protocol module: events flow one way, into it.
"""
