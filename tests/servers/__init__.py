"""Real servers the tests start themselves (Dovecot), shared with benchmarks/."""
