"""The prompt-writing method: chat formats (chat_format), `promote`, `score-preludes` (scoring),
`init` (init_workspace) and structured-output constraints from sidecars (constraints).
May import: errors, options, fs, backend, cache, local, server, workspace."""
