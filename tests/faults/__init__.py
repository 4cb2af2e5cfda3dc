"""Fault injection: real processes, real Redis and PostgreSQL, and the faults done to them."""
