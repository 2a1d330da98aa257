"""Pure math used by the pilots (no training loop): each fast estimator has a slow reference beside it."""
