"""The workspace commands as library functions: generating outputs (outputs), token statistics
(token_stats), the `cache` command (cache_admin), progress lines (progress) and the choice of a
backend for a run (choose_backend). May import every layer below: errors … method."""
