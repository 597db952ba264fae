"""The `pdserve` command: flags built from each process's config, `pdserve up`,
`pdserve health`, and the launching of pdserve processes."""
