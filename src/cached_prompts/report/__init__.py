"""report.html: what the page shows, read from the workspace (data), and the page itself (page,
assets/). May import every layer below: errors … commands."""
