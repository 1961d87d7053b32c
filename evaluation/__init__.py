"""Job-level evaluation: the final model against its base and its lineage, on stored suites."""
