"""`make demo`: a real deploy to private Postfix + Dovecot through Redis and a worker."""
