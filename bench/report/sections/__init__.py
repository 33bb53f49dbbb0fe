"""One module per section of docs/results.md; each has `section(ctx) -> str | None`."""
