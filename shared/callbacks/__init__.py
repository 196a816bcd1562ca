"""Callbacks of ASYNC steps: the signed token that binds a callback URL to one attempt
(``token``), and the HTTP receiver that applies callbacks in bulk (``receiver``)."""
