"""Job submission, resource plans and Ray metrics."""
