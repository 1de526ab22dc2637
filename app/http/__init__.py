"""HTTP plumbing shared by the REST API and the pages: middleware, limits, upload helpers."""
