"""Code that runs inside Ray actors and Ray Train workers."""
